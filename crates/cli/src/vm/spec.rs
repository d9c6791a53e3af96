//! A VM spec from a file and flags (`vm create`, `vm plan`), and the
//! `--ssh-key` and `--data-disk` arguments that `app deploy` shares.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use virt8ra_api::*;

/// A VM spec from a file and flags.
#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// Spec file (JSON or YAML, the API's VmCreate); flags override it.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long)]
    memory_mib: Option<u64>,
    #[arg(long)]
    disk_gib: Option<u64>,
    /// Pin to a site.
    #[arg(long)]
    site: Option<String>,
    /// Pin to a provider.
    #[arg(long)]
    provider: Option<String>,
    /// Pin to a country (ISO code).
    #[arg(long)]
    country: Option<String>,
    /// File with user data for the guest.
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// Guest TCP port to forward to the host (repeatable).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// An SSH public key the guest accepts: a file (a .pub file, or an
    /// authorized_keys file with one key per line) or the key line itself
    /// (repeatable; replaces the spec file's ssh_authorized_keys).
    #[arg(long = "ssh-key", value_name = "FILE_OR_LINE")]
    ssh_keys: Vec<String>,
    /// A data disk after the boot disk: `image=NAME` (a copy of an image),
    /// `image=NAME,size_gib=N` (grown to N GiB) or `size_gib=N` (blank);
    /// repeatable, in order (replaces the spec file's data_disks).
    #[arg(long = "data-disk", value_name = "image=NAME,size_gib=N")]
    data_disks: Vec<String>,
    /// A NIC on a virtual network: `NAME` or `NAME,ip=ADDRESS` (repeatable,
    /// in the order the guest sees them; replaces the spec file's nics).
    #[arg(long = "network", value_name = "NAME[,ip=ADDR]")]
    networks: Vec<String>,
    /// Publish a guest port on the address of the host that runs the VM:
    /// `8080:80` (TCP), `5353:53/udp`, `192.0.2.7:8080:80` (that host
    /// address only); `,network=NAME` picks the NIC (default: the first on
    /// a network with a gateway). Needs `--network`; repeatable (replaces
    /// the spec file's publish). A VM without NICs uses `--port`.
    #[arg(
        long = "publish",
        value_name = "[ADDR:]HOSTPORT:GUESTPORT[/udp][,network=NAME]"
    )]
    publish: Vec<String>,
    /// A rule of the VM's security group, applied to each of its NICs:
    /// `CIDR[:PROTO[:PORTS]]`, e.g. `0.0.0.0/0:tcp:80`, `192.0.2.0/24:icmp`,
    /// `10.0.0.0/8` (every protocol), `0.0.0.0/0:udp:5000-5010`; `none`
    /// lets nothing in but replies and published ports. Repeatable
    /// (replaces the spec file's ingress). Without any: what comes from
    /// each NIC's own network.
    #[arg(long = "allow", value_name = "CIDR[:PROTO[:PORTS]]")]
    allow: Vec<String>,
    /// Create it stopped.
    #[arg(long)]
    pub(crate) no_start: bool,
}

/// One `--data-disk` argument: `image=NAME`, `size_gib=N` or both,
/// comma-separated.
pub fn data_disk_arg(arg: &str) -> anyhow::Result<virt8ra_api::DataDisk> {
    let mut d = virt8ra_api::DataDisk {
        image: None,
        size_gib: None,
    };
    for part in arg.split(',') {
        match part.split_once('=') {
            Some(("image", v)) if !v.is_empty() && d.image.is_none() => d.image = Some(v.into()),
            Some(("size_gib", v)) if d.size_gib.is_none() => {
                let n: u64 = v.parse().map_err(|_| {
                    anyhow::anyhow!("--data-disk {arg}: size_gib {v:?} is not a whole number")
                })?;
                d.size_gib = Some(n);
            }
            _ => {
                bail!("--data-disk {arg}: expected image=NAME, size_gib=N or image=NAME,size_gib=N")
            }
        }
    }
    validate::data_disks(std::slice::from_ref(&d)).map_err(|e| {
        anyhow::anyhow!("--data-disk {arg}: {}", e.replace("data_disks[0]", "disk"))
    })?;
    Ok(d)
}

/// The keys of `--ssh-key` arguments: each is an OpenSSH public key line
/// (it starts with a key type and a space), or else a file holding one key
/// per line (blank lines and `#` comments skipped). Each key is checked
/// here, so a bad one is reported with the argument or file and line that
/// gave it.
pub fn ssh_keys(args: &[String]) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    for a in args {
        let is_line = validate::SSH_KEY_TYPES
            .iter()
            .any(|t| a.strip_prefix(t).is_some_and(|r| r.starts_with(' ')));
        if is_line {
            let k = a.trim_end();
            validate::ssh_key(k).map_err(|e| anyhow::anyhow!("--ssh-key: {e}"))?;
            keys.push(k.to_string());
            continue;
        }
        let text = std::fs::read_to_string(a).map_err(|e| {
            anyhow::anyhow!(
                "--ssh-key {a}: not a public key line (e.g. \"ssh-ed25519 AAAA... user@host\"), and not a readable file: {e}"
            )
        })?;
        let before = keys.len();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            validate::ssh_key(line).map_err(|e| anyhow::anyhow!("--ssh-key {a}:{}: {e}", i + 1))?;
            keys.push(line.to_string());
        }
        if keys.len() == before {
            bail!("--ssh-key {a}: the file holds no public key");
        }
    }
    Ok(keys)
}

/// The rules of `--allow` arguments (`none` alone: an empty group).
pub fn allow_rules(args: &[String]) -> anyhow::Result<Vec<IngressRule>> {
    if args.iter().any(|a| a == "none") {
        if args.len() > 1 {
            bail!("--allow none lets nothing in; it cannot be combined with other --allow rules");
        }
        return Ok(Vec::new());
    }
    args.iter()
        .map(|a| a.parse::<IngressRule>().map_err(anyhow::Error::msg))
        .collect()
}

/// Merges a spec file and flags into a VmCreate body.
pub(crate) fn build_spec(name: Option<String>, a: &SpecArgs) -> anyhow::Result<serde_json::Value> {
    let mut spec: serde_json::Value = match &a.file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not valid JSON or YAML", f.display()))?
        }
        None => serde_json::json!({}),
    };
    let Some(obj) = spec.as_object_mut() else {
        bail!("the spec must be a mapping of fields");
    };
    let mut set = |k: &str, v: serde_json::Value| {
        obj.insert(k.to_string(), v);
    };
    if let Some(v) = name {
        set("name", v.into());
    }
    if let Some(v) = &a.image {
        set("image", v.clone().into());
    }
    if let Some(v) = a.vcpus {
        set("vcpus", v.into());
    }
    if let Some(v) = a.memory_mib {
        set("memory_mib", v.into());
    }
    if let Some(v) = a.disk_gib {
        set("disk_gib", v.into());
    }
    if let Some(p) = &a.user_data {
        let ud = std::fs::read_to_string(p)
            .with_context(|| format!("read user data {}", p.display()))?;
        set("user_data", ud.into());
    }
    if !a.ports.is_empty() {
        set("ports", serde_json::json!(a.ports));
    }
    if !a.ssh_keys.is_empty() {
        set(
            "ssh_authorized_keys",
            serde_json::json!(ssh_keys(&a.ssh_keys)?),
        );
    }
    if !a.data_disks.is_empty() {
        let disks = a
            .data_disks
            .iter()
            .map(|d| data_disk_arg(d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        set("data_disks", serde_json::json!(disks));
    }
    if !a.networks.is_empty() {
        let nics = a
            .networks
            .iter()
            .map(|n| crate::network::nic_arg(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        validate::nics(&nics).map_err(|e| anyhow::anyhow!("--network: {e}"))?;
        set("nics", serde_json::json!(nics));
    }
    if !a.publish.is_empty() {
        let ports = a
            .publish
            .iter()
            .map(|p| p.parse::<VmPublish>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        set("publish", serde_json::json!(ports));
    }
    if !a.allow.is_empty() {
        set("ingress", serde_json::json!(allow_rules(&a.allow)?));
    }
    if a.no_start {
        set("start", false.into());
    }
    let no_nics = obj
        .get("nics")
        .and_then(|n| n.as_array())
        .is_none_or(|n| n.is_empty());
    if no_nics && !a.publish.is_empty() {
        bail!(
            "--publish needs a NIC on a network with a gateway (--network NAME); \
             a VM without NICs forwards guest ports to its host's loopback with --port"
        );
    }
    let mut pins = obj
        .get("placement")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    for (k, v) in [
        ("site", &a.site),
        ("provider", &a.provider),
        ("country", &a.country),
    ] {
        if let (Some(v), Some(m)) = (v, pins.as_object_mut()) {
            m.insert(k.into(), v.clone().into());
        }
    }
    obj.insert("placement".into(), pins);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN alice@example";

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: SpecArgs,
    }

    fn spec(args: &[&str]) -> anyhow::Result<serde_json::Value> {
        use clap::Parser;
        let cli = Cli::try_parse_from(std::iter::once("vm").chain(args.iter().copied()))?;
        build_spec(Some("web".into()), &cli.a)
    }

    #[test]
    fn publish_and_allow_flags_become_the_fields() {
        let v = spec(&[
            "--network",
            "backend",
            "--publish",
            "8080:80",
            "--publish",
            "192.0.2.7:5353:53/udp,network=backend",
            "--allow",
            "0.0.0.0/0:tcp:80",
            "--allow",
            "192.0.2.0/24:icmp",
        ])
        .expect("spec");
        assert_eq!(
            v["publish"],
            serde_json::json!([
                {"host_port": 8080, "guest_port": 80, "protocol": "tcp"},
                {"network": "backend", "address": "192.0.2.7", "host_port": 5353,
                 "guest_port": 53, "protocol": "udp"}
            ])
        );
        assert_eq!(
            v["ingress"],
            serde_json::json!([
                {"from": "0.0.0.0/0", "protocol": "tcp", "ports": "80"},
                {"from": "192.0.2.0/24", "protocol": "icmp"}
            ])
        );
        let v = spec(&["--network", "b", "--allow", "none"]).expect("spec");
        assert_eq!(v["ingress"], serde_json::json!([]));
        for (args, want) in [
            (
                &["--publish", "8080:80"][..],
                "--publish needs a NIC on a network with a gateway (--network NAME); a VM without NICs forwards guest ports to its host's loopback with --port",
            ),
            (&["--network", "b", "--publish", "80"], "--publish \"80\""),
            (&["--network", "b", "--publish", "1:1,net=b"], "--publish \"1:1,net=b\": after the port"),
            (&["--network", "b", "--allow", "none", "--allow", "10.0.0.0/8"], "--allow none"),
            (&["--network", "b", "--allow", "0.0.0.0/0:icmp:7"], "--allow \"0.0.0.0/0:icmp:7\""),
        ] {
            let e = spec(args).expect_err(want).to_string();
            assert!(e.starts_with(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn ssh_key_arguments_are_lines_or_files() {
        let d = tempfile::tempdir().expect("dir");
        let pubf = d.path().join("id.pub");
        std::fs::write(&pubf, format!("{KEY}\n")).expect("write");
        let many = d.path().join("authorized_keys");
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC6v8INylJkQCEx/FyBWvtTkbuC6DlOxFjwTZMrrIJ17xGGOVtfO/ldQlTopQERpWu4mPhwUFPYsFOorS+uaiXSQAeW5ZhGBF50qQ9qZ9gRuMR7CR6ISOXyo7kZAkXSYdSVMh6MwuFoaan6GPZFuMBFzq4I0rBOy1nE0ZyMLCw51w==";
        std::fs::write(&many, format!("# team\n\n{rsa}\n{KEY}\n")).expect("write");
        let args = [
            pubf.display().to_string(),
            format!("{KEY}\n"),
            many.display().to_string(),
        ];
        assert_eq!(ssh_keys(&args).expect("keys"), vec![KEY, KEY, rsa, KEY]);

        let e = ssh_keys(&["/nonexistent/id.pub".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--ssh-key /nonexistent/id.pub: not a public key line"),
            "{e}"
        );
        let e = ssh_keys(&["ssh-ed25519 AAAA".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--ssh-key: \"ssh-ed25519 AAAA\""), "{e}");
        std::fs::write(&many, format!("{KEY}\nssh-ed25519 AAAA x\n")).expect("write");
        let e = ssh_keys(&[many.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("--ssh-key {}:2: ", many.display())),
            "{e}"
        );
        let empty = d.path().join("empty.pub");
        std::fs::write(&empty, "# nothing\n").expect("write");
        let e = ssh_keys(&[empty.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no public key"), "{e}");
    }
}
