//! `cargo run --release -p virt8ra-placement --example bench -- HOSTS PLACEMENTS [pack|defaults]`
//!
//! Prints the benchmark report as JSON. `pack` (the default) scores by
//! packing alone, as `virt8ra bench placement` does; `defaults` uses the
//! operator's default weights (energy, cost, latency, balance as well).
fn main() {
    let mut a = std::env::args().skip(1);
    let hosts = a.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let n = a.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let pack_only = a.next().is_none_or(|s| s != "defaults");
    let r = virt8ra_placement::bench::run_bench_with(hosts, n, 42, pack_only);
    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
}
