//! `cargo run --release -p virt8ra-placement --example worst_cases`
//!
//! Latency of the request shapes the benchmark's mixed load does not
//! contain but the control plane will see: a rare host feature (GPUs are on
//! 2% of the generated hosts), a rare feature within one country, and two
//! unplaceable requests (a feature no host has, a country with no site),
//! which pay for the explanation. 300 decisions each, committed when placed.
use std::time::Instant;

use virt8ra_api::PlacementConstraints;
use virt8ra_placement::bench::topology;
use virt8ra_placement::{Engine, Request, Resources, Weights};

fn main() {
    for n in [10_000usize, 100_000] {
        let (s, h) = topology(n, 42);
        let mut e = Engine::new(s, h).expect("generated topology");
        let gpu = || vec!["gpu-nvidia".to_string()];
        for (label, c) in [
            (
                "gpu",
                PlacementConstraints {
                    accelerators: gpu(),
                    ..Default::default()
                },
            ),
            (
                "gpu in PL",
                PlacementConstraints {
                    accelerators: gpu(),
                    countries: vec!["PL".into()],
                    ..Default::default()
                },
            ),
            (
                "unplaceable: tdx",
                PlacementConstraints {
                    confidential: Some("tdx".into()),
                    ..Default::default()
                },
            ),
            (
                "unplaceable: IT",
                PlacementConstraints {
                    countries: vec!["IT".into()],
                    ..Default::default()
                },
            ),
        ] {
            let res = Resources {
                vcpus: 2,
                memory_mib: 4096,
                disk_gib: 10,
            };
            let r = Request::new(res, c, Weights::default()).expect("valid request");
            let mut lat = Vec::new();
            for i in 0..300 {
                let t = Instant::now();
                if let Ok(d) = e.place(&r) {
                    e.commit(&format!("{label}-{i}"), &d.host, &r)
                        .expect("commit");
                }
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            lat.sort_by(f64::total_cmp);
            println!(
                "{n} hosts, {label}: p50 {:.1} us, p99 {:.1} us",
                lat[150], lat[297]
            );
        }
    }
}
