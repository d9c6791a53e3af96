//! `virt8ra apply -f FILE.yaml`: infrastructure as code.
//!
//! The file declares providers, sites, images, networks, VMs and apps
//! (deployments of an appliance at several locations). `apply` reads what exists through the
//! API, computes a plan (per resource: `create`, `update`, `replace`,
//! `delete` or `unchanged`, with the changed fields), validates the whole
//! file and the whole plan, and only then makes the changes: creates and
//! updates in the order providers → sites → images → networks → VMs →
//! apps, deletions in the reverse order. A second apply of the same file
//! changes nothing and says so. `--dry-run` prints the plan and changes
//! nothing.
//!
//! Semantics:
//! - What is declared is created or brought to the declared values; fields
//!   left out take the API's defaults (a declared-state file, not a patch).
//! - What is absent is left alone, unless `--prune` is given: then resources
//!   that `apply` itself created (they carry the label
//!   `virt8ra.io/managed-by: apply`, set on creation only) and that the file
//!   no longer declares are deleted. Resources made by hand, or adopted by a
//!   file that declares an existing name, are never pruned.
//! - Fields that the API can change in place are updated (provider country,
//!   jurisdiction and labels; site city, coordinates, tier, facts and labels;
//!   a VM's power via `start`). Image content (sha256) or architecture
//!   changes are a `replace` (delete and import again), refused when VMs use
//!   the image. Any other change (a site's provider or country, a VM's size,
//!   image, placement, user data, SSH keys, network configuration, ports or
//!   labels) is a plan error that names
//!   the field: nothing is changed. With `--replace`, such a VM change is a
//!   `replace` instead (deleted, waited for, created again: its disk is lost).
//! - Networks (`networks:`, the fields of the API's network create request)
//!   are immutable for now: a declared network whose definition differs
//!   from the existing one (compared with the control plane's defaults
//!   filled in) is a plan error naming the field. Networks carry no labels,
//!   so `--prune` never deletes one. VMs declare `nics:`; a VM's network
//!   must be declared or exist.
//! - Apps: an entry has the fields of the deploy request (`appliance`,
//!   `name`, `locations`, `replicas_per_location`, `params`,
//!   `ssh_authorized_keys`, `labels`). The
//!   appliance is resolved through the API before anything changes (an
//!   unknown appliance or a bad parameter is an error with its line), and
//!   compared as resolved (`CATALOG/NAME@VERSION`: naming an appliance
//!   without a version means its newest one, so publishing a newer version
//!   makes the declared app differ) with its parameters as resolved
//!   (defaults filled in). Locations are compared as a set. Nothing of an
//!   app changes in place: any change is a plan error naming the field,
//!   or with `--replace` a `replace` (every replica deleted, the app deployed
//!   again). The marker label is on the app record itself (apps carry
//!   labels), not on its VMs, so `--prune` of VMs never touches replicas.
//!   Whether every replica fits is checked by the deploy itself (all or
//!   nothing), not in the plan.
//!
//! Every kind of resource is one implementation of [`Kind`] (read the
//! current state, compare, create, update, delete through the API), so a
//! new kind is one more implementation and one line in [`Plan`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use virt8ra_api::{
    validate, App, AppCreate, CatalogEntry, Image, Network, NetworkCreate, Page, PlacementPlan,
    PowerState, Provider, ProviderCreate, ProviderUpdate, Site, SiteCreate, SiteUpdate, Vm,
    VmAction, VmActionRequest, VmCreate, VmPhase,
};

use crate::client::{seg, Client};
use crate::output::{emit, table, Format};

mod execute;
mod kinds;
mod lines;
mod parse;
mod plan;

use execute::*;
use kinds::*;
use lines::Lines;
use parse::*;
use plan::*;

/// The label that marks resources created by `apply` (what `--prune` may delete).
pub const MANAGED_KEY: &str = "virt8ra.io/managed-by";
pub const MANAGED_VALUE: &str = "apply";

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// The YAML file that declares providers, sites, images, networks, VMs and apps.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also delete resources created by apply that the file no longer declares.
    #[arg(long)]
    pub prune: bool,
    /// Replace (delete, then create again) VMs and apps whose declared spec
    /// changed in a way that cannot be made in place. Their disks are lost.
    #[arg(long)]
    pub replace: bool,
    /// Seconds to wait for a pruned VM to be gone before deleting what it used.
    #[arg(long, default_value_t = 300)]
    pub wait_timeout: u64,
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// What `apply` prints (`-o json`).
#[derive(Debug, Serialize)]
pub struct ApplyReport {
    /// Whether the plan changes anything.
    pub changed: bool,
    pub dry_run: bool,
    /// Whether the changes were made (false on a dry run or when nothing changes).
    pub applied: bool,
    pub summary: BTreeMap<&'static str, usize>,
    pub plan: Vec<PlanRow>,
}

/// Runs `virt8ra apply`.
pub async fn run(c: &Client, o: Format, a: ApplyArgs) -> anyhow::Result<()> {
    let (doc, lines) = load(&a.file)?;
    let mut errs = Vec::new();
    check_entries(&doc, &lines, &mut errs);
    let base = a
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut downloads = Downloads::default();
    let images = resolve_images(c, &doc, &base, &lines, &mut downloads, &mut errs).await;
    fail_on(&errs)?;

    let live = LiveState {
        providers: Providers::list(c).await?,
        sites: Sites::list(c).await?,
        images: Images::list(c).await?,
        networks: Networks::list(c).await?,
        vms: Vms::list(c).await?,
        hosts: c.get::<Page<virt8ra_api::Host>>("/hosts").await?.items,
    };
    let live_apps = Apps::list(c).await?;
    check_vm_rules(c, &doc, &live.networks, &lines, &mut errs).await?;
    let apps = resolve_apps(c, &doc, &lines, &mut errs).await?;
    let settled_apps = settled_apps(&doc, &live_apps, &lines, &mut errs);
    // A VM on its way out is neither compared nor deleted again; declaring
    // its name has to wait until it is gone.
    let settled_vms: Vec<Vm> = live
        .vms
        .iter()
        .filter(|v| v.status.phase != VmPhase::Deleting)
        .cloned()
        .collect();
    for (i, v) in doc.vms.iter().enumerate() {
        if live
            .vms
            .iter()
            .any(|l| l.name == v.name && l.status.phase == VmPhase::Deleting)
        {
            errs.push(format!(
                "{}: vm {}: a VM of this name is being deleted; apply again once it is gone",
                lines.at("vms", i, Some("name")),
                v.name
            ));
        }
    }
    let plan = Plan {
        providers: plan_kind::<Providers>(&doc.providers, &live.providers, &a, &lines, &mut errs),
        sites: plan_kind::<Sites>(&doc.sites, &live.sites, &a, &lines, &mut errs),
        images: plan_kind::<Images>(&images, &live.images, &a, &lines, &mut errs),
        networks: plan_kind::<Networks>(&doc.networks, &live.networks, &a, &lines, &mut errs),
        vms: plan_kind::<Vms>(
            &at_least_images(&doc.vms, &live.images),
            &settled_vms,
            &a,
            &lines,
            &mut errs,
        ),
        apps: plan_kind::<Apps>(&apps, &settled_apps, &a, &lines, &mut errs),
    };
    check_references(&doc, &apps, &live, &plan, &lines, &mut errs);
    fail_on(&errs)?;

    let mut plan = plan;
    // Images still to be downloaded (a URL with a declared sha256) are
    // fetched and checked before the first change.
    if !a.dry_run {
        for s in plan.images.iter_mut() {
            let Some(d) = s.decl.as_mut() else { continue };
            if !matches!(s.action, Action::Create | Action::Replace) || d.local.is_some() {
                continue;
            }
            let Some(url) = d.url.clone() else { continue };
            let p = download(c, &url, &d.name, &mut downloads).await?;
            let sha = sha256_of(&p)?;
            if sha != d.sha256 {
                bail!(
                    "image {}: {url} has sha256 {sha}, not the declared {}; nothing was changed",
                    d.name,
                    d.sha256
                );
            }
            d.local = Some(p);
        }
    }

    let rows = plan.rows();
    let mut summary: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in &rows {
        *summary.entry(r.action.as_str()).or_default() += 1;
    }
    let changed = rows.iter().any(|r| r.action != Action::Unchanged);
    if changed && !a.dry_run {
        let x = Exec {
            c,
            wait: Duration::from_secs(a.wait_timeout),
            progress: o == Format::Table,
        };
        plan.execute(&x)
            .await
            .context("apply stopped; changes before this one were made (apply again to go on)")?;
    }
    let report = ApplyReport {
        changed,
        dry_run: a.dry_run,
        applied: changed && !a.dry_run,
        summary,
        plan: rows,
    };
    emit(o, &report, print_report)
}

fn fail_on(errs: &[String]) -> anyhow::Result<()> {
    match errs {
        [] => Ok(()),
        [one] => bail!("{one}; nothing was changed"),
        [first, rest @ ..] => bail!(
            "{first} (and {} more error(s)); nothing was changed",
            rest.len()
        ),
    }
}

fn print_report(r: &ApplyReport) {
    if !r.plan.is_empty() {
        table(
            &["kind", "name", "action", "changes"],
            r.plan
                .iter()
                .map(|p| {
                    vec![
                        p.kind.to_string(),
                        p.name.clone(),
                        p.action.as_str().to_string(),
                        p.changes
                            .iter()
                            .map(|c| format!("{}: {} -> {}", c.field, show(&c.from), show(&c.to)))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                })
                .collect(),
        );
    }
    if !r.changed {
        println!("no changes");
        return;
    }
    let counts = ["create", "update", "replace", "delete"]
        .iter()
        .map(|k| format!("{} {k}", r.summary.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ");
    if r.dry_run {
        println!("plan: {counts} (dry run: nothing was changed)");
    } else {
        println!("applied: {counts}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_disks_are_compared_at_least_as_large_as_their_images() {
        let img = |name: &str, gib: u64| -> Image {
            serde_json::from_value(json!({
                "id": format!("id-{name}"), "name": name, "sha256": "0".repeat(64),
                "format": "qcow2", "source_format": "qcow2", "size_bytes": 1,
                "virtual_size_bytes": (gib << 30) - 5, "arch": "x86_64",
                "created_at": "2026-01-01T00:00:00Z",
            }))
            .expect("image")
        };
        let vm: VmCreate = serde_json::from_value(json!({
            "name": "v", "image": "debian", "disk_gib": 1,
            "data_disks": [{"image": "id-big"}, {"image": "small"}, {"size_gib": 3}],
        }))
        .expect("vm");
        let images = [img("debian", 2), img("big", 5), img("small", 1)];
        let got = at_least_images(std::slice::from_ref(&vm), &images);
        assert_eq!(got[0].disk_gib, 2);
        let sizes: Vec<Option<u64>> = got[0].data_disks.iter().map(|d| d.size_gib).collect();
        assert_eq!(sizes, vec![Some(5), None, Some(3)]);
        // An image not stored yet: as declared.
        let same = at_least_images(std::slice::from_ref(&vm), &[]);
        assert_eq!(same[0].disk_gib, 1);
        assert_eq!(same[0].data_disks, vm.data_disks);
    }

    #[test]
    fn diff_reports_only_changed_fields() {
        let a = json!({"city": "A", "facts": {"pue": 1.2}, "labels": {}, "ports": []});
        let b = json!({"city": "A", "facts": {"pue": 1.4}, "ports": null});
        let d = diff(&a, &b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].field, "facts.pue");
    }

    #[test]
    fn messages_map_to_their_field() {
        let f = |m| field_of(m, VM_FIELDS);
        assert_eq!(
            f("placement: unknown user location \"X\": name a city"),
            Some("placement")
        );
        assert_eq!(f("invalid vm name \"A\""), Some("name"));
        assert_eq!(f("unknown country code \"XX\""), Some("country"));
        assert_eq!(
            f("memory_mib 1 is outside 16..16777216"),
            Some("memory_mib")
        );
        assert_eq!(f("port 0 cannot be forwarded"), Some("ports"));
    }

    #[test]
    fn bad_keys_and_networks_name_their_line() {
        let dir = std::env::temp_dir().join(format!("virt8ra-apply-ctx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("ctx.yaml");
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOiakisE7iP/Y3q4YCqhXcGDKYvynw8ekG2NX341waDN a@b";
        std::fs::write(
            &f,
            format!(
                "vms:\n  - name: good\n    image: i\n    ssh_authorized_keys: [\"{key}\"]\n    network:\n      ethernets:\n        - {{addresses: [10.0.2.15/24], gateway4: 10.0.2.2}}\n\
                 \x20 - name: badkey\n    image: i\n    ssh_authorized_keys:\n      - ssh-ed25519 AAAA\n\
                 \x20 - name: badnet\n    image: i\n    network:\n      ethernets:\n        - addresses: [10.0.2.300/24]\n\
                 apps:\n  - name: shop\n    appliance: web\n    locations: [es]\n    ssh_authorized_keys: [\"not a key\"]\n"
            ),
        )
        .expect("write");
        let (doc, lines) = load(&f).expect("parses");
        let mut errs = Vec::new();
        check_entries(&doc, &lines, &mut errs);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        let file = f.display().to_string();
        assert!(
            errs[0].starts_with(&format!("{file}:21: app shop: ssh_authorized_keys[0]: ")),
            "{errs:#?}"
        );
        assert!(
            errs[1].starts_with(&format!("{file}:10: vm badkey: ssh_authorized_keys[0]: ")),
            "{errs:#?}"
        );
        assert!(
            errs[2].starts_with(&format!(
                "{file}:14: vm badnet: network.ethernets[0].addresses[0]: \"10.0.2.300/24\" is not an address"
            )),
            "{errs:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Errors through `load` and `check_entries` on files that an
    /// indentation scanner cannot read: flow style, anchors and aliases.
    #[test]
    fn flow_style_and_aliases_name_their_line() {
        let dir = std::env::temp_dir().join(format!("virt8ra-apply-flow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("flow.yaml");
        let file = f.display().to_string();
        let check = |text: &str| {
            std::fs::write(&f, text).expect("write");
            let (doc, lines) = load(&f).expect("parses");
            let mut errs = Vec::new();
            check_entries(&doc, &lines, &mut errs);
            errs
        };
        let errs = check("vms: [{name: a, image: x, memory_mib: 0}]\n");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(&format!("{file}:1: vm a: memory_mib")),
            "{errs:#?}"
        );
        let errs = check(
            "# flow style over lines\nvms: [\n  {name: a, image: x, memory_mib: 512},\n  {name: b, image: x,\n   memory_mib: 0},\n]\n",
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(&format!("{file}:5: vm b: memory_mib")),
            "{errs:#?}"
        );
        let errs = check(
            "vms:\n  - &small\n    name: a\n    image: x\n    memory_mib: &mem 0\n  - name: b\n    image: x\n    memory_mib: *mem\n  - *small\n",
        );
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(
            errs[0].starts_with(&format!("{file}:9: vms: \"a\" is declared twice")),
            "{errs:#?}"
        );
        assert!(
            errs[1].starts_with(&format!("{file}:5: vm a: memory_mib")),
            "{errs:#?}"
        );
        assert!(
            errs[2].starts_with(&format!("{file}:8: vm b: memory_mib")),
            "{errs:#?}"
        );
        assert!(
            errs[3].starts_with(&format!("{file}:9: vm a: memory_mib")),
            "{errs:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_locate_entries_and_fields() {
        let text = "providers:\n  - name: a\n    country: DE\n  - name: b\n    country: XX\nvms:\n- name: v\n  image: i\n";
        let l = Lines::new(Path::new("f.yaml"), text);
        assert_eq!(l.at("providers", 1, Some("country")), "f.yaml:5");
        assert_eq!(l.at("providers", 0, None), "f.yaml:2");
        assert_eq!(l.at("vms", 0, Some("image")), "f.yaml:8");
        assert_eq!(l.section("vms"), "f.yaml:6");
    }

    #[test]
    fn unknown_fields_name_their_line() {
        let dir = std::env::temp_dir().join(format!("virt8ra-apply-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("x.yaml");
        std::fs::write(
            &f,
            "providers:\n  - name: a\n    country: DE\n    contry: DE\n",
        )
        .expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x.yaml:4:"), "{e}");
        assert!(e.contains("unknown field `contry`"), "{e}");
        std::fs::write(&f, "providers:\n# none yet\nvms:\n").expect("write");
        assert!(load(&f).is_ok(), "empty lists are allowed");
        std::fs::write(&f, "vms:\n  - name: a\n    image: i\n    vcpus: many\n").expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x.yaml:4:"), "{e}");
        std::fs::write(
            &f,
            "apps:\n  - name: a\n    appliance: web\n    locations: [DE]\n    replica: 2\n",
        )
        .expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("x.yaml:5:"), "{e}");
        assert!(e.contains("unknown field `replica`"), "{e}");
        std::fs::write(&f, "apps:\n  - name: a\n    locations: [DE]\n").expect("write");
        let e = load(&f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("missing field `appliance`"), "{e}");
        std::fs::write(
            &f,
            "apps:\n  - name: a\n    appliance: web\n    locations: [DE, ES]\n",
        )
        .expect("write");
        let (doc, _) = load(&f).expect("an app entry");
        assert_eq!(doc.apps[0].replicas_per_location, 1);
        assert_eq!(doc.apps[0].locations, ["DE", "ES"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
