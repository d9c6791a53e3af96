//! The audit log's and the residency trail's rules, on both backends (a
//! child of `conformance.rs`, whose helpers and `both!` it uses).

use chrono::{Duration, TimeZone, Utc};
use virt8ra_api::*;

use super::{migration, vm, Backend, Postgres, Sqlite};
use crate::records::AuditFilter;
use crate::store::Store;

both!(
    audit_records_are_appended_in_order_and_found_by_filter,
    the_audit_log_refuses_updates_and_keeps_records_across_reopen,
    the_residency_trail_follows_the_vms_writes_and_outlives_it,
    exports_add_a_copy_to_the_trail,
);

fn record(min: i64, token: &str, kind: &str, resource: &str, status: u16) -> AuditRecord {
    AuditRecord {
        seq: 0,
        at: Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap() + Duration::minutes(min),
        request_id: format!("req-{min}"),
        actor: AuditActor {
            token_id: Some(token.into()),
            token_kind: Some(kind.into()),
            ..Default::default()
        },
        method: "POST".into(),
        route: "/api/v1/vms".into(),
        resource: resource.into(),
        status,
        remote_addr: Some("127.0.0.1:5000".into()),
    }
}

fn filter() -> AuditFilter {
    AuditFilter {
        limit: 100,
        ..Default::default()
    }
}

async fn audit_records_are_appended_in_order_and_found_by_filter<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let recs = [
        record(0, "adm", "admin", "vms/web", 201),
        record(1, "adm", "admin", "vms/web/migrate", 202),
        record(2, "h1", "host", "staging/x", 200),
        record(3, "adm", "admin", "vms/web2", 409),
        record(4, "adm", "admin", "vms/web", 202),
    ];
    let mut seqs = Vec::new();
    for r in &recs {
        seqs.push(s.append_audit(r).await.unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let all = s.list_audit(&filter()).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[3].status, 409);
    assert_eq!(all[3].seq, seqs[3]);
    assert_eq!(all[0].remote_addr.as_deref(), Some("127.0.0.1:5000"));
    // A resource and what is under it, not its namesakes ("vms/web2").
    let mut f = filter();
    f.resource = Some("vms/web".into());
    let got: Vec<_> = s.list_audit(&f).await.unwrap();
    let ids: Vec<_> = got.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, ["req-0", "req-1", "req-4"]);
    // By token id or kind.
    let mut f = filter();
    f.actor = Some("host".into());
    assert_eq!(s.list_audit(&f).await.unwrap().len(), 1);
    f.actor = Some("adm".into());
    assert_eq!(s.list_audit(&f).await.unwrap().len(), 4);
    // By the user a token belongs to and the project it is scoped to.
    let mut ana = record(5, "t-ana", "user", "vms/shop-web", 201);
    ana.actor.user = Some("ana".into());
    ana.actor.project = Some("shop".into());
    let mut ben = record(6, "t-ben", "user", "vms/lab-web", 201);
    ben.actor.user = Some("ben".into());
    ben.actor.project = Some("lab".into());
    for r in [&ana, &ben] {
        s.append_audit(r).await.unwrap();
    }
    let mut f = filter();
    f.user = Some("ana".into());
    let got = s.list_audit(&f).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].request_id, "req-5");
    let mut f = filter();
    f.project = Some("lab".into());
    let got = s.list_audit(&f).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].actor.user.as_deref(), Some("ben"));
    f.user = Some("ana".into());
    assert!(s.list_audit(&f).await.unwrap().is_empty());
    // A time window: since is inclusive, until exclusive.
    let mut f = filter();
    f.since = Some(recs[1].at);
    f.until = Some(recs[3].at);
    let ids: Vec<_> = s.list_audit(&f).await.unwrap();
    assert_eq!(ids.len(), 2);
    // Pages by cursor.
    let mut f = filter();
    f.limit = 2;
    let p1 = s.list_audit(&f).await.unwrap();
    f.after_seq = Some(p1[1].seq);
    let p2 = s.list_audit(&f).await.unwrap();
    assert_eq!(p2[0].request_id, "req-2");
    // Retention removes the old records only; numbers are not reused.
    assert_eq!(s.prune_audit(recs[2].at).await.unwrap(), 2);
    let left = s.list_audit(&filter()).await.unwrap();
    assert_eq!(left[0].request_id, "req-2");
    let next = s
        .append_audit(&record(9, "adm", "admin", "x", 200))
        .await
        .unwrap();
    assert!(next > seqs[4]);
}

async fn the_audit_log_refuses_updates_and_keeps_records_across_reopen<B: Backend>() {
    let b = B::new();
    {
        let s = b.open().await;
        s.append_audit(&record(0, "adm", "admin", "vms/web", 201))
            .await
            .unwrap();
        let e = B::try_exec(&s, "UPDATE audit_log SET resource = 'nothing'")
            .await
            .unwrap_err();
        assert!(e.contains("the audit log is append-only"), "{e}");
    }
    let s = b.open().await;
    let all = s.list_audit(&filter()).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].resource, "vms/web");
}

fn placed(mut v: Vm, host: &str, country: &str) -> Vm {
    v.status.phase = VmPhase::Scheduled;
    v.status.host = Some(host.into());
    v.status.host_id = Some(format!("id-{host}"));
    v.status.site = Some(format!("site-{host}"));
    v.status.provider = Some(format!("prov-{host}"));
    v.status.country = Some(country.into());
    v
}

async fn the_residency_trail_follows_the_vms_writes_and_outlives_it<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    let v = vm("web");
    s.create_vm(&v, &["created"]).await.unwrap();
    assert!(s.vm_residency("vm-web").await.unwrap().is_empty());
    // Placed by the scheduler.
    let mut v = placed(v, "h1", "ES");
    s.update_vm(&v, Some("scheduled")).await.unwrap();
    // A write that does not move it leaves the trail alone.
    v.status.phase = VmPhase::Running;
    s.update_vm(&v, None).await.unwrap();
    let t = s.vm_residency("vm-web").await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].reason, ResidencyReason::Placed);
    assert_eq!((t[0].vcpus, t[0].memory_mib, t[0].disk_gib), (1, 128, 1));
    assert!(t[0].to.is_none());
    // Moved by a migration: the move and its commit in one write.
    let mut m = migration("m1", &v);
    v.status.migration = Some("m1".into());
    s.create_migration(&m, &v, "m1 started").await.unwrap();
    assert_eq!(s.vm_residency("vm-web").await.unwrap().len(), 1);
    let mut v = placed(v, "h2", "DE");
    m.phase = MigrationPhase::SwitchingOver;
    s.update_migration(&m, Some(&v), Some("switched"))
        .await
        .unwrap();
    // And a second, part of an evacuation.
    m.evacuation = Some("host(s) h2".into());
    m.mode = MigrationMode::Live;
    v = placed(v, "h3", "PL");
    s.update_migration(&m, Some(&v), Some("switched"))
        .await
        .unwrap();
    // Deleted: the last interval closes, the trail stays.
    v.status.phase = VmPhase::Deleted;
    s.update_vm(&v, Some("deleted")).await.unwrap();
    let t = s.vm_residency("vm-web").await.unwrap();
    let countries: Vec<_> = t.iter().map(|i| i.country.clone().unwrap()).collect();
    assert_eq!(countries, ["ES", "DE", "PL"]);
    let reasons: Vec<_> = t.iter().map(|i| i.reason).collect();
    assert_eq!(
        reasons,
        [
            ResidencyReason::Placed,
            ResidencyReason::ColdMigration,
            ResidencyReason::Evacuation
        ]
    );
    assert_eq!(t[0].ended_by.as_deref(), Some("cold migration m1"));
    assert_eq!(t[2].ended_by.as_deref(), Some("deleted"));
    assert!(t.iter().all(|i| i.to.is_some()));
    assert!(t.windows(2).all(|w| w[0].to == Some(w[1].from)));
    assert_eq!(t.iter().map(|i| i.seq).collect::<Vec<_>>(), [1, 2, 3]);
    // Windows find what overlaps them.
    let all = s
        .residency_between(
            t[0].from - Duration::hours(1),
            Utc::now() + Duration::hours(1),
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let none = s
        .residency_between(
            Utc::now() + Duration::hours(1),
            Utc::now() + Duration::hours(2),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    // A VM placed when created starts its trail in that write.
    s.create_vm(&placed(vm("db"), "h1", "ES"), &["created"])
        .await
        .unwrap();
    let t = s.vm_residency("vm-db").await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].reason, ResidencyReason::Created);
    // One made by `vm import` says so, and where its disks came from.
    let mut imp = placed(vm("imp"), "h1", "ES");
    imp.labels
        .insert("virt8ra.io/imported-from".into(), "bundle of VM x".into());
    s.create_vm(&imp, &["created"]).await.unwrap();
    let t = s.vm_residency("vm-imp").await.unwrap();
    assert_eq!(t[0].reason, ResidencyReason::Imported);
    assert_eq!(t[0].detail, "imported: bundle of VM x");
}

async fn exports_add_a_copy_to_the_trail<B: Backend>() {
    let b = B::new();
    let s = b.open().await;
    s.create_vm(&placed(vm("web"), "h1", "ES"), &["created"])
        .await
        .unwrap();
    let mut e = VmExport {
        id: "e1".into(),
        vm_id: "vm-web".into(),
        vm: "web".into(),
        state: "uploading".into(),
        sha256: None,
        size_bytes: None,
        error: None,
        url_path: "/api/v1/staging/e1".into(),
        data_disks: vec![],
        created_at: Utc::now(),
    };
    s.put_export(&e).await.unwrap();
    e.state = "ready".into();
    s.put_export(&e).await.unwrap();
    let t = s.vm_residency("vm-web").await.unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[1].copy, "export:e1");
    assert_eq!(t[1].reason, ResidencyReason::Export);
    assert!(t[1].site.is_none() && t[1].to.is_none());
    // The VM's own interval is untouched by its export.
    assert!(t[0].to.is_none());
    e.state = "ready (removed)".into();
    s.put_export(&e).await.unwrap();
    let t = s.vm_residency("vm-web").await.unwrap();
    assert_eq!(t[1].ended_by.as_deref(), Some("export ready (removed)"));
    assert!(t[0].to.is_none());
}
