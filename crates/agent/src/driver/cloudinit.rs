//! Guest contextualization in the standard guests already understand:
//! cloud-init's NoCloud data source, as a small FAT volume labelled `cidata`
//! holding
//!
//! - `meta-data`: `instance-id`, `local-hostname`, the site as
//!   `virt8ra-site`, and the VM's SSH keys as `public-keys` (a list of
//!   OpenSSH key lines, which cloud-init installs for the image's default
//!   user);
//! - `user-data`: the VM's user data, verbatim (an empty `#cloud-config`
//!   without it);
//! - `network-config`: only when the VM has a network configuration, as a
//!   cloud-init network-config version 2 document (`version: 2`,
//!   `ethernets:` keyed by an id, each with its `match`). An entry the user
//!   gave without a match means the VM's first NIC and is matched by its MAC
//!   address: [`FIRST_NIC_MAC`], which the QEMU driver sets on the
//!   user-mode NIC, or the MAC of the VM's first NIC on a virtual network.
//!
//! Written with mtools, so no mounting and no root privileges are needed.
//!
//! Every scalar is written as a YAML double-quoted string (JSON string
//! syntax, with control and line-separator characters escaped), so no
//! value can end its line or change the document's structure, whatever it
//! holds. The layout is fixed (two spaces per level, one field per line,
//! lists in block style) so that guests without a YAML parser, such as the
//! busybox test appliance, can read it with a few lines of awk.

use std::fmt::Write as _;
use std::path::Path;

use virt8ra_api::NetworkConfig;

use super::{DriverError, GuestContext, Result};

/// MAC address of a VM's first (and only) NIC. It is QEMU's own default for
/// the first NIC, set explicitly so the guest's network configuration can
/// match it.
pub const FIRST_NIC_MAC: &str = "52:54:00:12:34:56";

/// A YAML double-quoted scalar holding exactly `s`.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Control characters, NEL, the line and paragraph separators
            // (YAML line breaks) and the byte-order mark: escaped.
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `meta-data` document (YAML).
pub fn meta_data(c: &GuestContext) -> String {
    let mut s = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&c.instance_id),
        q(&c.hostname)
    );
    if let Some(site) = &c.site {
        let _ = writeln!(s, "virt8ra-site: {}", q(site));
    }
    if !c.ssh_authorized_keys.is_empty() {
        s.push_str("public-keys:\n");
        for k in &c.ssh_authorized_keys {
            let _ = writeln!(s, "  - {}", q(k));
        }
    }
    s
}

/// The `network-config` document (cloud-init network-config version 2).
/// `first_mac`: the MAC an entry without a match is matched by.
pub fn network_config(n: &NetworkConfig, first_mac: &str) -> String {
    let mut s = String::from("version: 2\nethernets:\n");
    for (i, e) in n.ethernets.iter().enumerate() {
        let (name, mac) = match &e.match_ {
            Some(m) => (m.name.clone(), m.macaddress.clone()),
            None => (None, Some(first_mac.to_string())),
        };
        // The id: the interface's name when it is matched by name (the v2
        // convention), else one of our own.
        let id = name.clone().unwrap_or_else(|| format!("nic{i}"));
        let _ = writeln!(s, "  {}:", q(&id));
        s.push_str("    match:\n");
        if let Some(name) = &name {
            let _ = writeln!(s, "      name: {}", q(name));
        }
        if let Some(mac) = &mac {
            let _ = writeln!(s, "      macaddress: {}", q(&mac.to_ascii_lowercase()));
        }
        let _ = writeln!(s, "    dhcp4: {}", e.dhcp4);
        if !e.addresses.is_empty() {
            s.push_str("    addresses:\n");
            for a in &e.addresses {
                let _ = writeln!(s, "      - {}", q(a));
            }
        }
        if let Some(g) = &e.gateway4 {
            let _ = writeln!(s, "    gateway4: {}", q(g));
        }
        if let Some(ns) = &e.nameservers {
            s.push_str("    nameservers:\n");
            for (key, list) in [("addresses", &ns.addresses), ("search", &ns.search)] {
                if list.is_empty() {
                    continue;
                }
                let _ = writeln!(s, "      {key}:");
                for v in list {
                    let _ = writeln!(s, "        - {}", q(v));
                }
            }
        }
        if let Some(mtu) = e.mtu {
            let _ = writeln!(s, "    mtu: {mtu}");
        }
    }
    s
}

/// Writes `seed.img` into `dir` for `c`, replacing any older one.
pub async fn write_seed(dir: &Path, c: &GuestContext) -> Result<()> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| DriverError::Io(what, e)
    };
    let work = dir.join("seed.d");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io("create the seed directory"))?;
    let mut files = vec!["meta-data", "user-data"];
    std::fs::write(work.join("meta-data"), meta_data(c)).map_err(io("write meta-data"))?;
    let user = c
        .user_data
        .clone()
        .unwrap_or_else(|| "#cloud-config\n{}\n".to_string());
    std::fs::write(work.join("user-data"), user).map_err(io("write user-data"))?;
    if let Some(n) = &c.network {
        let first = c.first_mac.as_deref().unwrap_or(FIRST_NIC_MAC);
        std::fs::write(work.join("network-config"), network_config(n, first))
            .map_err(io("write network-config"))?;
        files.push("network-config");
    }
    let tmp = dir.join("seed.img.tmp");
    let _ = std::fs::remove_file(&tmp);
    let img = tmp.to_string_lossy().to_string();
    run(
        "mformat",
        &["-C", "-f", "1440", "-v", "cidata", "-i", &img, "::"],
    )
    .await?;
    for f in files {
        let src = work.join(f).to_string_lossy().to_string();
        run("mcopy", &["-i", &img, &src, &format!("::{f}")]).await?;
    }
    std::fs::rename(&tmp, dir.join("seed.img")).map_err(io("write seed.img"))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

async fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .map_err(|e| DriverError::Other(format!("cannot run {cmd} (install mtools): {e}")))?;
    if !out.status.success() {
        return Err(DriverError::Other(format!(
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_yaml::Value;
    use virt8ra_api::{EthernetConfig, InterfaceMatch, Nameservers};

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN alice@example";

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap_or_else(|e| panic!("not YAML ({e}):\n{s}"))
    }

    #[test]
    fn meta_data_names_the_instance_host_site_and_keys() {
        let c = GuestContext {
            instance_id: "i-1".into(),
            hostname: "web-1".into(),
            site: Some("pl-gdansk".into()),
            ssh_authorized_keys: vec![KEY.into(), "ssh-rsa AAAAB3 bob@host".into()],
            ..Default::default()
        };
        let m = meta_data(&c);
        assert!(
            m.starts_with(
                "instance-id: \"i-1\"\nlocal-hostname: \"web-1\"\nvirt8ra-site: \"pl-gdansk\"\n"
            ),
            "{m}"
        );
        let v = yaml(&m);
        assert_eq!(v["instance-id"], "i-1");
        assert_eq!(v["local-hostname"], "web-1");
        assert_eq!(v["virt8ra-site"], "pl-gdansk");
        assert_eq!(v["public-keys"][0], KEY);
        assert_eq!(v["public-keys"][1], "ssh-rsa AAAAB3 bob@host");
        // Without keys there is no public-keys entry at all.
        let plain = meta_data(&GuestContext {
            ssh_authorized_keys: vec![],
            ..c
        });
        assert!(yaml(&plain).get("public-keys").is_none(), "{plain}");
    }

    #[test]
    fn hostile_strings_stay_one_value() {
        let hostile = [
            "x\"\nlocal-hostname: evil",
            "a\\\"b",
            "- [not, a, list]",
            "key: value # comment",
            "tab\there\r\u{7f}\u{85}\u{2028}\u{2029}\u{feff}end",
            "ünïcødé ✓ 🚀",
            "'single' & *alias !tag %directive @",
        ];
        for h in hostile {
            let c = GuestContext {
                instance_id: "i".into(),
                hostname: h.into(),
                site: Some(h.into()),
                ssh_authorized_keys: vec![format!("ssh-ed25519 AAAA {h}")],
                ..Default::default()
            };
            let m = meta_data(&c);
            // One line per field, whatever the value holds.
            assert_eq!(m.lines().count(), 5, "{m}");
            let v = yaml(&m);
            assert_eq!(v["local-hostname"], h, "{m}");
            assert_eq!(v["virt8ra-site"], h, "{m}");
            assert_eq!(
                v["public-keys"][0],
                format!("ssh-ed25519 AAAA {h}").as_str()
            );
            assert_eq!(v.as_mapping().map(|m| m.len()), Some(4), "{m}");
        }
    }

    fn sample_network() -> NetworkConfig {
        NetworkConfig {
            ethernets: vec![
                EthernetConfig {
                    addresses: vec!["10.0.2.15/24".into(), "10.0.2.77/24".into()],
                    gateway4: Some("10.0.2.2".into()),
                    nameservers: Some(Nameservers {
                        addresses: vec!["10.0.2.3".into()],
                        search: vec!["example.test".into(), "corp.example".into()],
                    }),
                    mtu: Some(1400),
                    ..Default::default()
                },
                EthernetConfig {
                    match_: Some(InterfaceMatch {
                        name: Some("eth1".into()),
                        macaddress: None,
                    }),
                    dhcp4: true,
                    ..Default::default()
                },
                EthernetConfig {
                    match_: Some(InterfaceMatch {
                        name: None,
                        macaddress: Some("52:54:00:AB:CD:EF".into()),
                    }),
                    dhcp4: true,
                    nameservers: Some(Nameservers {
                        addresses: vec![],
                        search: vec!["only.search".into()],
                    }),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn network_config_is_cloud_init_version_2() {
        // A VM on a virtual network: its first NIC's MAC instead.
        let doc = network_config(&sample_network(), "02:aa:bb:cc:dd:ee");
        let v = yaml(&doc);
        assert_eq!(
            v["ethernets"]["nic0"]["match"]["macaddress"],
            "02:aa:bb:cc:dd:ee"
        );
        let doc = network_config(&sample_network(), FIRST_NIC_MAC);
        let v = yaml(&doc);
        assert_eq!(v["version"], 2);
        let eths = v["ethernets"].as_mapping().unwrap();
        assert_eq!(eths.len(), 3, "{doc}");
        // No match given: the first NIC, by the MAC the driver gives it.
        let first = &v["ethernets"]["nic0"];
        assert_eq!(first["match"]["macaddress"], FIRST_NIC_MAC);
        assert!(first["match"].get("name").is_none());
        assert_eq!(first["dhcp4"], false);
        assert_eq!(first["addresses"][0], "10.0.2.15/24");
        assert_eq!(first["addresses"][1], "10.0.2.77/24");
        assert_eq!(first["gateway4"], "10.0.2.2");
        assert_eq!(first["nameservers"]["addresses"][0], "10.0.2.3");
        assert_eq!(first["nameservers"]["search"][1], "corp.example");
        assert_eq!(first["mtu"], 1400);
        // Matched by name: keyed by that name.
        let by_name = &v["ethernets"]["eth1"];
        assert_eq!(by_name["match"]["name"], "eth1");
        assert!(by_name["match"].get("macaddress").is_none());
        assert_eq!(by_name["dhcp4"], true);
        assert!(by_name.get("addresses").is_none() && by_name.get("mtu").is_none());
        // Matched by MAC: written in lower case, as cloud-init compares it.
        let by_mac = &v["ethernets"]["nic2"];
        assert_eq!(by_mac["match"]["macaddress"], "52:54:00:ab:cd:ef");
        assert!(by_mac["nameservers"].get("addresses").is_none());
        assert_eq!(by_mac["nameservers"]["search"][0], "only.search");
    }

    async fn seed_file(img: &str, f: &str) -> Option<String> {
        let out = tokio::process::Command::new("mtype")
            .args(["-i", img, &format!("::{f}")])
            .output()
            .await
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    }

    #[tokio::test]
    async fn the_seed_is_a_cidata_volume_with_the_documents() {
        let d = tempfile::tempdir().unwrap();
        let mut c = GuestContext {
            instance_id: "i-1".into(),
            hostname: "web-1".into(),
            site: None,
            user_data: Some("#!/bin/sh\necho hi\n".into()),
            ssh_authorized_keys: vec![KEY.into()],
            network: None,
            first_mac: None,
        };
        write_seed(d.path(), &c).await.unwrap();
        let img = d.path().join("seed.img");
        let img = img.to_str().unwrap();
        let label = std::process::Command::new("mlabel")
            .args(["-s", "-i", img, "::"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&label.stdout)
                .to_lowercase()
                .contains("cidata"),
            "{}",
            String::from_utf8_lossy(&label.stdout)
        );
        assert_eq!(
            seed_file(img, "user-data").await.as_deref(),
            Some("#!/bin/sh\necho hi\n")
        );
        assert_eq!(seed_file(img, "meta-data").await, Some(meta_data(&c)));
        // No network configuration: no network-config file (the image's default).
        assert_eq!(seed_file(img, "network-config").await, None);

        c.network = Some(sample_network());
        write_seed(d.path(), &c).await.unwrap();
        assert_eq!(
            seed_file(img, "network-config").await,
            Some(network_config(&sample_network(), FIRST_NIC_MAC))
        );
        assert!(!d.path().join("seed.d").exists() && !d.path().join("seed.img.tmp").exists());
    }
}
