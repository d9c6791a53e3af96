//! The networks API end to end (issue 27, the control plane's part): a
//! real control plane, the real CLI, and, where VMs must be placed or
//! moved, real agents with the simulated driver. Networks are created,
//! shown and deleted; every bad input is a 4xx that names the problem and
//! changes nothing; IPAM hands out each address once under concurrent
//! creates and takes it back when the VM goes; a VM is placed, and moved,
//! only where its networks reach; `apply -f` declares networks and NICs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{assert_error, Cluster, TOPOLOGY};
use serde_json::{json, Value};

fn names(c: &Cluster, path: &str) -> Vec<String> {
    c.ok("GET", path, None)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect()
}

/// The networks and VMs, to compare before and after a refused request.
fn state(c: &Cluster) -> (Value, Value) {
    (
        c.ok("GET", "/api/v1/networks", None),
        c.ok("GET", "/api/v1/vms?include_deleted=true", None),
    )
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap()
}

mod netapi {
    use super::*;

    /// Create, list, show and delete through the CLI, with the defaults the
    /// issue asks for; each bad network is a 400 (a taken name a 409) that
    /// names what is wrong and creates nothing.
    #[test]
    fn networks_are_created_shown_listed_and_deleted() {
        let c = Cluster::start();
        c.create_topology();
        let n = json_of(&c.cli_ok(&[
            "network",
            "create",
            "backend",
            "--cidr",
            "10.20.0.0/24",
            "--countries",
            "ES,DE",
            "--dns",
            "1.1.1.1",
            "-o",
            "json",
        ]));
        assert_eq!(n["name"], "backend");
        assert_eq!(n["cidr"], "10.20.0.0/24");
        assert_eq!(n["gateway"], "10.20.0.1", "the first host by default");
        assert_eq!(
            n["mtu"],
            virt8ra_api::DEFAULT_MTU,
            "1500 less VXLAN and the tunnel"
        );
        assert_eq!(n["nat"], true);
        assert_eq!(n["dns"], json!(["1.1.1.1"]));
        assert_eq!(n["span"], json!({"countries": ["ES", "DE"]}));
        assert!(n["vni"].as_u64().unwrap() >= 1, "{n}");
        let l2 = json_of(&c.cli_ok(&[
            "network",
            "create",
            "l2",
            "--cidr",
            "192.168.7.0/28",
            "--no-gateway",
            "--mtu",
            "9000",
            "-o",
            "json",
        ]));
        assert!(l2.get("gateway").is_none(), "{l2}");
        assert_eq!(
            (l2["nat"].clone(), l2["mtu"].clone()),
            (json!(false), json!(9000))
        );
        assert_ne!(l2["vni"], n["vni"], "each network its own VNI");

        assert_eq!(names(&c, "/api/v1/networks"), ["backend", "l2"]);
        let table = c.cli_ok(&["network", "list"]);
        assert!(
            table.contains("backend") && table.contains("countries ES, DE"),
            "{table}"
        );
        let shown = json_of(&c.cli_ok(&["network", "show", "backend", "-o", "json"]));
        assert_eq!(shown, n);
        assert_eq!(
            c.ok(
                "GET",
                &format!("/api/v1/networks/{}", n["id"].as_str().unwrap()),
                None
            ),
            n
        );

        let before = state(&c);
        let bad = |body: Value, status: u16, needle: &str| {
            assert_error(
                c.api("POST", "/api/v1/networks", Some(body)),
                status,
                needle,
            );
        };
        bad(
            json!({"name": "backend", "cidr": "10.99.0.0/24"}),
            409,
            "network 'backend' already exists",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0"}),
            400,
            "cidr: invalid CIDR",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.300/24"}),
            400,
            "cidr: invalid CIDR",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.5/24"}),
            400,
            "host bits set",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/31"}),
            400,
            "/8 to /30",
        );
        bad(
            json!({"name": "X_1", "cidr": "10.20.0.0/24"}),
            400,
            "invalid network name",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "gateway": "10.21.0.1"}),
            400,
            "gateway: 10.21.0.1 is not a host address",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "no_gateway": true, "nat": true}),
            400,
            "nat: outbound NAT needs a gateway",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "mtu": 100}),
            400,
            "mtu: 100 is outside 576..9000",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "span": {"countries": ["XX"]}}),
            400,
            "span.countries: unknown country code \"XX\"",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "span": {"providers": ["nope"]}}),
            400,
            "span.providers: provider 'nope' not found",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "span": {"sites": ["nowhere"]}}),
            400,
            "span.sites: site 'nowhere' not found",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "span": {"countries": ["FR"], "sites": ["de-frankfurt"]}}),
            400,
            "site 'de-frankfurt' is in DE, outside the span's countries FR",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "span": {"providers": ["provider-es"], "sites": ["de-frankfurt"]}}),
            400,
            "site 'de-frankfurt' belongs to provider 'provider-de', outside the span's providers provider-es",
        );
        bad(
            json!({"name": "x", "cidr": "10.20.0.0/24", "vlan": 3}),
            400,
            "vlan",
        );
        assert_eq!(state(&c), before, "a refused network changed something");
        // The CLI says the same, on one line, and exits non-zero.
        let out = c.cli(&["network", "create", "x", "--cidr", "10.0.0.1/8"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("host bits set") && err.trim().lines().count() == 1,
            "{err}"
        );

        assert_error(
            c.api("GET", "/api/v1/networks/nothing", None),
            404,
            "nothing",
        );
        assert_error(
            c.api("DELETE", "/api/v1/networks/nothing", None),
            404,
            "nothing",
        );
        c.cli_ok(&["network", "delete", "l2"]);
        assert_eq!(names(&c, "/api/v1/networks"), ["backend"]);
    }

    /// Every bad NIC is a 4xx naming the problem, and creates nothing: no
    /// VM, and no address taken.
    #[test]
    fn bad_nics_are_refused_and_change_nothing() {
        let c = Cluster::start();
        c.create_topology();
        c.import_tiny_image();
        let net = |name: &str, cidr: &str, span: Value| {
            c.ok(
                "POST",
                "/api/v1/networks",
                Some(json!({"name": name, "cidr": cidr, "span": span})),
            );
        };
        net("a", "10.1.0.0/24", json!({}));
        net("wide", "10.0.0.0/8", json!({}));
        net("b", "10.2.0.0/24", json!({}));
        net("de-only", "10.3.0.0/24", json!({"countries": ["DE"]}));
        net("fr-only", "10.4.0.0/24", json!({"countries": ["FR"]}));
        net("pl-only", "10.5.0.0/24", json!({"sites": ["pl-gdansk"]}));
        let holder = c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "holder", "image": "tiny", "nics": [{"network": "a", "ip": "10.1.0.10"}]})),
        );
        assert_eq!(holder["status"]["nics"][0]["ip"], "10.1.0.10");

        let before = state(&c);
        let bad = |nics: Value, placement: Value, status: u16, needle: &str| {
            let body = json!({"name": "v", "image": "tiny", "nics": nics, "placement": placement});
            assert_error(c.api("POST", "/api/v1/vms", Some(body)), status, needle);
        };
        let none = json!({});
        bad(
            json!([{"network": "nope"}]),
            none.clone(),
            400,
            "nics[0]: network 'nope' not found",
        );
        bad(
            json!([{"network": "a"}, {"network": "wide"}]),
            none.clone(),
            400,
            "overlaps network 'a'",
        );
        bad(
            json!([{"network": "a"}, {"network": "a"}]),
            none.clone(),
            400,
            "at most one NIC per network",
        );
        bad(
            json!([{"network": "a", "ip": "10.9.0.5"}]),
            none.clone(),
            400,
            "address 10.9.0.5 is outside network 'a' (10.1.0.0/24)",
        );
        bad(
            json!([{"network": "a", "ip": "10.1.0.255"}]),
            none.clone(),
            400,
            "broadcast address",
        );
        bad(
            json!([{"network": "a", "ip": "10.1.0.0"}]),
            none.clone(),
            400,
            "the network address",
        );
        bad(
            json!([{"network": "a", "ip": "10.1.0.1"}]),
            none.clone(),
            400,
            "gateway of network 'a'",
        );
        bad(
            json!([{"network": "a", "ip": "10.1.0.10"}]),
            none.clone(),
            409,
            "address 10.1.0.10 on network 'a' is already taken by VM 'holder'",
        );
        bad(
            json!([{"network": "fr-only"}]),
            json!({"country": "DE"}),
            400,
            "network 'fr-only' reaches only countries FR, but the VM's placement is pinned to DE",
        );
        bad(
            json!([{"network": "de-only"}]),
            json!({"site": "es-logrono"}),
            400,
            "nics[0]: network 'de-only' does not reach any site the VM may run at",
        );
        bad(
            json!([{"network": "de-only"}, {"network": "pl-only"}]),
            none.clone(),
            400,
            "network 'pl-only'",
        );
        let nine: Vec<Value> = (0..9)
            .map(|i| json!({"network": format!("n{i}")}))
            .collect();
        bad(json!(nine), none.clone(), 400, "at most 8");
        assert_eq!(state(&c), before, "a refused VM changed something");
        // The address asked for that was refused is still free for others.
        let ok = c.ok("POST", "/api/v1/vms", Some(json!({"name": "ok", "image": "tiny", "nics": [{"network": "a", "ip": "10.1.0.11"}]})));
        assert_eq!(ok["status"]["nics"][0]["ip"], "10.1.0.11");

        // The CLI: bad --network syntax is one line and a non-zero exit,
        // before anything is sent.
        for arg in ["a,ip=10.1.0", ",ip=10.1.0.5", "a,mac=02:00:00:00:00:01"] {
            let out = c.cli(&["vm", "create", "v", "--image", "tiny", "--network", arg]);
            assert!(!out.status.success(), "{arg}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.starts_with(&format!("error: --network {arg}: "))
                    || err.contains(&format!("--network {arg}: ")),
                "{err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
        let v = json_of(&c.cli_ok(&[
            "vm",
            "create",
            "cli",
            "--image",
            "tiny",
            "--network",
            "b,ip=10.2.0.9",
            "--network",
            "a",
            "-o",
            "json",
        ]));
        let nics = v["status"]["nics"].as_array().unwrap();
        assert_eq!(nics.len(), 2);
        assert_eq!(
            (nics[0]["network"].clone(), nics[0]["ip"].clone()),
            (json!("b"), json!("10.2.0.9"))
        );
        assert_eq!(
            (nics[1]["network"].clone(), nics[1]["ip"].clone()),
            (json!("a"), json!("10.1.0.2"))
        );
        assert_eq!(nics[0]["prefix"], 24);
        assert!(nics[0]["mac"].as_str().unwrap().starts_with("02:"), "{v}");
        let table = c.cli_ok(&["vm", "show", "cli"]);
        let line = table.lines().find(|l| l.starts_with("nics")).unwrap();
        assert!(
            line.contains("b ")
                && line.contains(nics[0]["mac"].as_str().unwrap())
                && line.contains("10.2.0.9/24"),
            "{table}"
        );
    }

    /// 40 creates at once on a /27 (29 addresses besides the gateway):
    /// every address handed out once, the rest refused with 409 "no free
    /// address", none lost. Then a network with NICs cannot be deleted;
    /// deleting a VM frees its address for the next VM; once no VM is left
    /// the network goes (204).
    #[test]
    fn concurrent_creates_get_distinct_addresses_and_deletes_free_them() {
        let c = Cluster::start();
        c.import_tiny_image();
        c.ok(
            "POST",
            "/api/v1/networks",
            Some(json!({"name": "small", "cidr": "10.7.0.0/27"})),
        );
        let (url, token) = (c.url.clone(), c.token.clone());
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let (url, token) = (url.clone(), token.clone());
                std::thread::spawn(move || {
                    let r = reqwest::blocking::Client::new()
                        .post(format!("{url}/api/v1/vms"))
                        .bearer_auth(token)
                        .json(&json!({"name": format!("c{i}"), "image": "tiny", "nics": [{"network": "small"}]}))
                        .timeout(Duration::from_secs(120))
                        .send()
                        .unwrap();
                    (r.status().as_u16(), r.json::<Value>().unwrap())
                })
            })
            .collect();
        let answers: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let mut ips = BTreeSet::new();
        let mut refused = 0;
        for (s, v) in &answers {
            match s {
                201 => {
                    let ip = v["status"]["nics"][0]["ip"].as_str().unwrap().to_string();
                    assert!(ips.insert(ip.clone()), "{ip} handed out twice");
                }
                409 => {
                    refused += 1;
                    let m = v["error"]["message"].as_str().unwrap();
                    assert!(m.contains("network small has no free address"), "{m}");
                }
                _ => panic!("unexpected answer {s}: {v}"),
            }
        }
        assert_eq!(ips.len(), 29, "29 addresses, none lost: {ips:?}");
        assert_eq!(refused, 11);
        let expect: BTreeSet<String> = (2..=30).map(|h| format!("10.7.0.{h}")).collect();
        assert_eq!(
            ips, expect,
            "neither .0, the gateway .1 nor the broadcast .31"
        );
        // What the API says is what was answered.
        let vms = c.ok("GET", "/api/v1/vms", None);
        assert_eq!(vms["items"].as_array().unwrap().len(), 29);

        // A network with NICs on it stays, and says whose.
        let holder = answers
            .iter()
            .find(|(s, v)| *s == 201 && v["status"]["nics"][0]["ip"] == "10.7.0.5")
            .map(|(_, v)| v["name"].as_str().unwrap().to_string())
            .unwrap();
        let (s, body) = c.api("DELETE", "/api/v1/networks/small", None);
        assert_eq!(s, 409, "{body}");
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains("still has NICs of 29 VM(s)"), "{m}");
        let out = c.cli(&["network", "delete", "small"]);
        assert!(!out.status.success());

        // Its address is free once the VM is deleted, and goes to the next.
        c.cli_ok(&["vm", "delete", &holder, "--wait"]);
        let next = c.ok(
            "POST",
            "/api/v1/vms",
            Some(json!({"name": "next", "image": "tiny", "nics": [{"network": "small"}]})),
        );
        assert_eq!(next["status"]["nics"][0]["ip"], "10.7.0.5");
        assert_error(
            c.api(
                "POST",
                "/api/v1/vms",
                Some(json!({"name": "full", "image": "tiny", "nics": [{"network": "small"}]})),
            ),
            409,
            "network small has no free address",
        );
        for v in c.ok("GET", "/api/v1/vms", None)["items"]
            .as_array()
            .unwrap()
        {
            c.ok(
                "DELETE",
                &format!("/api/v1/vms/{}", v["id"].as_str().unwrap()),
                None,
            );
        }
        let (s, body) = c.api("DELETE", "/api/v1/networks/small", None);
        assert_eq!(s, 204, "{body}");
        assert!(names(&c, "/api/v1/networks").is_empty());
    }

    /// With simulated hosts at three sites in ES, DE and PL: a VM is placed
    /// only where its network reaches, a migration outside the span is
    /// refused naming the network, one inside it goes ahead with the
    /// address unchanged, and deleting the placed VM (through its agent)
    /// frees the address.
    #[test]
    fn vms_are_placed_and_moved_only_where_their_networks_reach() {
        let mut c = Cluster::start();
        c.create_topology();
        for (i, (_, _, site, ..)) in TOPOLOGY.iter().enumerate() {
            c.start_agent_with(&format!("sim-{i}"), Some(site), &["--driver", "sim"]);
        }
        c.wait_hosts_ready(3);
        // Each agent made a tunnel key and reported its public half; each
        // host got its own address inside the tunnels, kept across a
        // restart of the control plane.
        let tunnels = |c: &Cluster| -> Vec<(String, String)> {
            let hosts = c.ok("GET", "/api/v1/hosts", None);
            let mut out: Vec<(String, String)> = hosts["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    let key = h["inventory"]["tunnel_public_key"].as_str().unwrap_or("");
                    assert_eq!(key.len(), 44, "a base64 WireGuard key: {h}");
                    let a = h["tunnel_address"].as_str().unwrap_or("").to_string();
                    assert!(a.starts_with("100."), "a tunnel address: {h}");
                    (h["name"].as_str().unwrap().to_string(), a)
                })
                .collect();
            out.sort();
            out
        };
        let before = tunnels(&c);
        let addresses: std::collections::BTreeSet<&String> =
            before.iter().map(|(_, a)| a).collect();
        assert_eq!(addresses.len(), 3, "distinct: {before:?}");
        c.kill_server();
        c.start_server();
        c.wait_hosts_ready(3);
        assert_eq!(tunnels(&c), before, "kept across a restart");
        c.import_tiny_image();
        c.ok("POST", "/api/v1/networks", Some(json!({"name": "es-pl", "cidr": "10.8.0.0/24", "span": {"countries": ["ES", "PL"]}})));
        c.ok(
            "POST",
            "/api/v1/networks",
            Some(
                json!({"name": "pl-site", "cidr": "10.9.0.0/24", "span": {"sites": ["pl-gdansk"]}}),
            ),
        );
        // A dry run says where its network lets it go.
        let plan = c.ok(
            "POST",
            "/api/v1/vms/plan",
            Some(json!({"name": "p", "image": "tiny", "nics": [{"network": "pl-site"}]})),
        );
        assert_eq!(plan["site"], "pl-gdansk", "{plan}");
        assert_error(
            c.api(
                "POST",
                "/api/v1/vms/plan",
                Some(
                    json!({"name": "p", "image": "tiny", "placement": {"country": "DE"},
                            "nics": [{"network": "pl-site"}]}),
                ),
            ),
            400,
            "network 'pl-site' does not reach any site",
        );
        for i in 0..4 {
            c.ok("POST", "/api/v1/vms", Some(json!({"name": format!("w{i}"), "image": "tiny", "memory_mib": 64, "nics": [{"network": "es-pl"}]})));
        }
        for i in 0..4 {
            let v = c.wait_phase(&format!("w{i}"), "running", Duration::from_secs(60));
            let country = v["status"]["country"].as_str().unwrap();
            assert!(
                country == "ES" || country == "PL",
                "placed in {country}: {v}"
            );
        }
        c.ok("POST", "/api/v1/vms", Some(json!({"name": "db", "image": "tiny", "memory_mib": 64, "nics": [{"network": "es-pl"}, {"network": "pl-site", "ip": "10.9.0.50"}]})));
        let db = c.wait_phase("db", "running", Duration::from_secs(60));
        assert_eq!(db["status"]["site"], "pl-gdansk", "{db}");
        let ip = db["status"]["nics"][0]["ip"].clone();

        // Out of the span: refused, naming the network; nothing moves.
        let w0 = c.vm("w0");
        let (s, body) = c.api(
            "POST",
            "/api/v1/vms/w0/migrate",
            Some(json!({"to_site": "de-frankfurt"})),
        );
        assert_eq!(s, 409, "{body}");
        let m = body["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("network 'es-pl' does not reach site de-frankfurt"),
            "{m}"
        );
        let (s, body) = c.api(
            "POST",
            "/api/v1/vms/w0/migrate",
            Some(json!({"to_country": "DE"})),
        );
        assert_eq!(s, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("network 'es-pl'"),
            "{body}"
        );
        let (s, body) = c.api(
            "POST",
            "/api/v1/vms/db/migrate",
            Some(json!({"to_host": "sim-0"})),
        );
        assert_eq!(s, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("network 'pl-site' does not reach site es-logrono"),
            "{body}"
        );
        // With no target named, the engine finds nowhere else for db.
        let (s, body) = c.api("POST", "/api/v1/vms/db/migrate", Some(json!({})));
        assert_eq!(s, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("'pl-site': sites pl-gdansk"),
            "{body}"
        );
        assert_eq!(c.vm("w0")["status"]["host"], w0["status"]["host"]);

        // Inside the span: it moves, keeping its address.
        let to = if w0["status"]["country"] == "ES" {
            "pl-gdansk"
        } else {
            "es-logrono"
        };
        let m = json_of(&c.cli_ok(&[
            "vm",
            "migrate",
            "w0",
            "--to-site",
            to,
            "--wait",
            "-o",
            "json",
        ]));
        assert_eq!(m["phase"], "completed", "{m}");
        let moved = c.vm("w0");
        assert_eq!(moved["status"]["site"], to);
        assert_eq!(
            moved["status"]["nics"], w0["status"]["nics"],
            "the NIC changed with the move"
        );

        // Deleted through its agent, db's addresses are free again.
        c.cli_ok(&["vm", "delete", "db", "--wait"]);
        let again = c.ok("POST", "/api/v1/vms", Some(json!({"name": "db2", "image": "tiny", "memory_mib": 64, "nics": [{"network": "pl-site", "ip": "10.9.0.50"}, {"network": "es-pl", "ip": ip}]})));
        assert_eq!(again["status"]["nics"][0]["ip"], "10.9.0.50");
        assert_eq!(again["status"]["nics"][1]["ip"], ip);

        // Evacuating the Polish host moves what may go to Spain, and
        // leaves db2, whose network reaches only that site, saying why.
        c.wait_phase("db2", "running", Duration::from_secs(60));
        let ev = c.ok("POST", "/api/v1/hosts/sim-2/evacuate", Some(json!({})));
        let why = ev["refused"]["db2"].as_str().unwrap_or_default();
        assert!(why.contains("'pl-site': sites pl-gdansk"), "{ev}");
        for m in ev["migrations"].as_array().unwrap() {
            assert_ne!(m["vm"], "db2");
            assert_eq!(m["target"]["site"], "es-logrono", "{m}");
        }
    }

    /// `apply -f` with a network and two VMs on it: created in order
    /// (network before VMs), the second apply a no-op; a changed network is
    /// a plan error naming the field, and nothing changes.
    #[test]
    fn apply_declares_networks_and_nics() {
        let c = Cluster::start();
        c.import_tiny_image();
        let file = c.dir.path().join("estate.yaml");
        let text = "networks:\n  - name: app\n    cidr: 10.30.0.0/24\n    dns: [9.9.9.9]\nvms:\n  - name: web\n    image: tiny\n    nics:\n      - network: app\n        ip: 10.30.0.20\n  - name: db\n    image: tiny\n    nics: [{network: app}]\n";
        std::fs::write(&file, text).unwrap();
        let f = file.to_str().unwrap();
        let first = json_of(&c.cli_ok(&["apply", "-f", f, "-o", "json"]));
        assert_eq!(first["applied"], true, "{first}");
        let kinds: Vec<(String, String)> = first["plan"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["kind"].as_str().unwrap().into(),
                    r["action"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("network".into(), "create".into()),
                ("vm".into(), "create".into()),
                ("vm".into(), "create".into())
            ]
        );
        assert_eq!(c.vm("web")["status"]["nics"][0]["ip"], "10.30.0.20");
        assert_eq!(c.vm("db")["status"]["nics"][0]["ip"], "10.30.0.2");
        let n = c.ok("GET", "/api/v1/networks/app", None);
        assert_eq!(
            (n["gateway"].clone(), n["dns"].clone()),
            (json!("10.30.0.1"), json!(["9.9.9.9"]))
        );

        let before = state(&c);
        let again = json_of(&c.cli_ok(&["apply", "-f", f, "-o", "json"]));
        assert_eq!(again["changed"], false, "{again}");
        assert_eq!(state(&c), before, "a no-op apply changed something");

        std::fs::write(&file, text.replace("10.30.0.0/24", "10.31.0.0/24")).unwrap();
        let out = c.cli(&["apply", "-f", f]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(":3: network app: cidr cannot change in place"),
            "{err}"
        );
        std::fs::write(
            &file,
            format!("{text}  - name: cache\n    image: tiny\n    nics: [{{network: nope}}]\n"),
        )
        .unwrap();
        let out = c.cli(&["apply", "-f", f]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("nics[0]: network \"nope\" is neither declared nor known"),
            "{err}"
        );
        assert_eq!(state(&c), before, "a refused apply changed something");
    }
}
