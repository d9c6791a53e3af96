//! `cargo run --release -p virt8ra-placement --example bench -- HOSTS PLACEMENTS`
fn main() {
    let mut a = std::env::args().skip(1);
    let hosts = a.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let n = a.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let r = virt8ra_placement::bench::run_bench(hosts, n, 42);
    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
}
