//! Versioned schema upgrades. (Called upgrades, not migrations: in virt8ra
//! a migration moves a VM between hosts.)
//!
//! Each entry is applied once, in order, inside one transaction together with
//! the bump of `PRAGMA user_version`; a database newer than this build is
//! refused rather than guessed at. Never edit a released upgrade: add one.

pub const UPGRADES: &[(&str, &str)] = &[
    (
        "initial schema",
        r#"
CREATE TABLE providers (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
CREATE TABLE sites (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX sites_provider ON sites(provider);
CREATE TABLE hosts (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    site TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX hosts_site ON hosts(site);
CREATE TABLE images (
    id     TEXT PRIMARY KEY,
    name   TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    body   TEXT NOT NULL
);
CREATE TABLE vms (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    phase    TEXT NOT NULL,
    host_id  TEXT,
    site     TEXT,
    provider TEXT,
    country  TEXT,
    image_id TEXT,
    body     TEXT NOT NULL
);
CREATE UNIQUE INDEX vms_live_name ON vms(name) WHERE phase <> 'deleted';
CREATE INDEX vms_host ON vms(host_id);
CREATE INDEX vms_image ON vms(image_id);
CREATE TABLE vm_events (
    vm_id   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    at      TEXT NOT NULL,
    phase   TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (vm_id, seq)
);
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    site       TEXT,
    host_id    TEXT,
    expires_at TEXT,
    uses_left  INTEGER,
    created_at TEXT NOT NULL
);
"#,
    ),
    (
        "VM migrations and exports",
        r#"
CREATE TABLE migrations (
    id         TEXT PRIMARY KEY,
    vm_id      TEXT NOT NULL,
    phase      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX migrations_vm ON migrations(vm_id, created_at);
-- At most one migration of a VM runs at a time.
CREATE UNIQUE INDEX migrations_one_active ON migrations(vm_id)
    WHERE phase NOT IN ('completed', 'failed');
CREATE TABLE exports (
    id    TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    body  TEXT NOT NULL
);
"#,
    ),
    (
        "documents: catalogs, appliances and apps",
        r#"
CREATE TABLE documents (
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE UNIQUE INDEX documents_name ON documents(kind, name);
"#,
    ),
    (
        "VMs found by name whatever their phase",
        r#"
-- `vms_live_name` is partial (live VMs only), so a lookup by id or name
-- could not use it and scanned the table: 1,000,000 rows per GET.
CREATE INDEX vms_name ON vms(name);
"#,
    ),
    (
        "VM events keyed by (vm_id, seq) alone",
        r#"
-- A rowid table with a TEXT primary key keeps a second b-tree for that key,
-- so every event was two b-tree inserts (four events per VM created). The
-- rows are small and always read by (vm_id, seq): WITHOUT ROWID stores them
-- once, in that order.
CREATE TABLE vm_events_by_vm (
    vm_id   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    at      TEXT NOT NULL,
    phase   TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (vm_id, seq)
) WITHOUT ROWID;
INSERT INTO vm_events_by_vm (vm_id, seq, at, phase, message)
    SELECT vm_id, seq, at, phase, message FROM vm_events ORDER BY vm_id, seq;
DROP TABLE vm_events;
ALTER TABLE vm_events_by_vm RENAME TO vm_events;
"#,
    ),
    (
        "no index of VMs by host",
        r#"
-- Host ids are random, so every VM created inserted into this index at a
-- random page (measured at 300,000 VMs: 5% of the bytes the control plane
-- writes per VM). The one query that used it, host deletion's count of the
-- host's VMs, now asks the control plane's in-memory index and placement
-- engine, where every other per-host read already went.
DROP INDEX vms_host;
"#,
    ),
    (
        "virtual networks and the addresses their NICs hold",
        r#"
CREATE TABLE networks (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    vni  INTEGER NOT NULL UNIQUE,
    body TEXT NOT NULL
);
-- One row per NIC of a VM that is not deleted: the primary key is what
-- makes IPAM safe (no address handed out twice, whatever the
-- concurrency), and a network with rows cannot be deleted.
CREATE TABLE nic_leases (
    network TEXT NOT NULL,
    ip      TEXT NOT NULL,
    vm      TEXT NOT NULL,
    nic     TEXT NOT NULL UNIQUE,
    mac     TEXT NOT NULL,
    PRIMARY KEY (network, ip)
) WITHOUT ROWID;
CREATE UNIQUE INDEX nic_leases_mac ON nic_leases(network, mac);
CREATE INDEX nic_leases_vm ON nic_leases(vm);
"#,
    ),
];
