//! Versioned schema upgrades. (Called upgrades, not migrations: in virt8ra
//! a migration moves a VM between hosts.)
//!
//! One numbered history for both backends: upgrade N is the same change
//! written once in SQLite's SQL and once in PostgreSQL's, so a database of
//! either kind at version N has the same tables, columns, constraints and
//! indexes (where an upgrade is about SQLite's storage alone, its
//! PostgreSQL side says so and changes nothing). Each entry is applied
//! once, in order, inside one transaction together with the record of its
//! number: `PRAGMA user_version` in SQLite, a row of `schema_upgrades` in
//! PostgreSQL. A database newer than this build is refused rather than
//! guessed at. Never edit a released upgrade: add one, to both columns.
//!
//! PostgreSQL's text columns are declared `COLLATE "C"`: SQLite compares
//! text byte by byte, and so must every `ORDER BY name`, `id > cursor` and
//! timestamp comparison here, whatever locale the database was created in.

/// One schema upgrade, in both backends' SQL.
pub struct Upgrade {
    /// What it changes (for the record; PostgreSQL keeps it with the number).
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

pub const UPGRADES: &[Upgrade] = &[
    Upgrade {
        name: "initial schema",
        sqlite: r#"
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
        postgres: r#"
CREATE TABLE providers (
    id   TEXT COLLATE "C" PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    body TEXT NOT NULL
);
CREATE TABLE sites (
    id       TEXT COLLATE "C" PRIMARY KEY,
    name     TEXT COLLATE "C" NOT NULL UNIQUE,
    provider TEXT COLLATE "C" NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX sites_provider ON sites(provider);
CREATE TABLE hosts (
    id   TEXT COLLATE "C" PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    site TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX hosts_site ON hosts(site);
CREATE TABLE images (
    id     TEXT COLLATE "C" PRIMARY KEY,
    name   TEXT COLLATE "C" NOT NULL UNIQUE,
    sha256 TEXT COLLATE "C" NOT NULL,
    body   TEXT NOT NULL
);
CREATE TABLE vms (
    id       TEXT COLLATE "C" PRIMARY KEY,
    name     TEXT COLLATE "C" NOT NULL,
    phase    TEXT COLLATE "C" NOT NULL,
    host_id  TEXT COLLATE "C",
    site     TEXT COLLATE "C",
    provider TEXT COLLATE "C",
    country  TEXT COLLATE "C",
    image_id TEXT COLLATE "C",
    body     TEXT NOT NULL
);
CREATE UNIQUE INDEX vms_live_name ON vms(name) WHERE phase <> 'deleted';
CREATE INDEX vms_host ON vms(host_id);
CREATE INDEX vms_image ON vms(image_id);
CREATE TABLE vm_events (
    vm_id   TEXT COLLATE "C" NOT NULL,
    seq     BIGINT NOT NULL,
    at      TEXT COLLATE "C" NOT NULL,
    phase   TEXT COLLATE "C" NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (vm_id, seq)
);
CREATE TABLE tokens (
    id         TEXT COLLATE "C" PRIMARY KEY,
    kind       TEXT COLLATE "C" NOT NULL,
    hash       TEXT COLLATE "C" NOT NULL UNIQUE,
    site       TEXT COLLATE "C",
    host_id    TEXT COLLATE "C",
    expires_at TEXT COLLATE "C",
    uses_left  BIGINT,
    created_at TEXT COLLATE "C" NOT NULL
);
"#,
    },
    Upgrade {
        name: "VM migrations and exports",
        sqlite: r#"
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
        postgres: r#"
CREATE TABLE migrations (
    id         TEXT COLLATE "C" PRIMARY KEY,
    vm_id      TEXT COLLATE "C" NOT NULL,
    phase      TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX migrations_vm ON migrations(vm_id, created_at);
-- At most one migration of a VM runs at a time.
CREATE UNIQUE INDEX migrations_one_active ON migrations(vm_id)
    WHERE phase NOT IN ('completed', 'failed');
CREATE TABLE exports (
    id    TEXT COLLATE "C" PRIMARY KEY,
    vm_id TEXT COLLATE "C" NOT NULL,
    body  TEXT NOT NULL
);
"#,
    },
    Upgrade {
        name: "documents: catalogs, appliances and apps",
        sqlite: r#"
CREATE TABLE documents (
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE UNIQUE INDEX documents_name ON documents(kind, name);
"#,
        postgres: r#"
CREATE TABLE documents (
    kind TEXT COLLATE "C" NOT NULL,
    id   TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE UNIQUE INDEX documents_name ON documents(kind, name);
"#,
    },
    Upgrade {
        name: "VMs found by name whatever their phase",
        sqlite: r#"
-- `vms_live_name` is partial (live VMs only), so a lookup by id or name
-- could not use it and scanned the table: 1,000,000 rows per GET.
CREATE INDEX vms_name ON vms(name);
"#,
        postgres: r#"
CREATE INDEX vms_name ON vms(name);
"#,
    },
    Upgrade {
        name: "VM events keyed by (vm_id, seq) alone",
        sqlite: r#"
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
        postgres: r#"
-- Nothing to change: a PostgreSQL table is a heap beside its primary
-- key's index whatever it is declared as; there is no rowid b-tree to drop.
"#,
    },
    Upgrade {
        name: "no index of VMs by host",
        sqlite: r#"
-- Host ids are random, so every VM created inserted into this index at a
-- random page (measured at 300,000 VMs: 5% of the bytes the control plane
-- writes per VM). The one query that used it, host deletion's count of the
-- host's VMs, now asks the control plane's in-memory index and placement
-- engine, where every other per-host read already went.
DROP INDEX vms_host;
"#,
        postgres: r#"
DROP INDEX vms_host;
"#,
    },
    Upgrade {
        name: "virtual networks and the addresses their NICs hold",
        sqlite: r#"
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
        postgres: r#"
CREATE TABLE networks (
    id   TEXT COLLATE "C" PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    vni  BIGINT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
-- The primary key makes IPAM safe, as in SQLite's.
CREATE TABLE nic_leases (
    network TEXT COLLATE "C" NOT NULL,
    ip      TEXT COLLATE "C" NOT NULL,
    vm      TEXT COLLATE "C" NOT NULL,
    nic     TEXT COLLATE "C" NOT NULL UNIQUE,
    mac     TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (network, ip)
);
CREATE UNIQUE INDEX nic_leases_mac ON nic_leases(network, mac);
CREATE INDEX nic_leases_vm ON nic_leases(vm);
"#,
    },
    Upgrade {
        name: "user tokens: owner, scope, role and name",
        sqlite: r#"
-- A person's API token: its owner (a user's name), its scope (platform,
-- project:NAME or provider:NAME), its role in that scope and its name.
-- Admin, join and host tokens leave them NULL.
ALTER TABLE tokens ADD COLUMN user_name TEXT;
ALTER TABLE tokens ADD COLUMN scope TEXT;
ALTER TABLE tokens ADD COLUMN role TEXT;
ALTER TABLE tokens ADD COLUMN token_name TEXT;
"#,
        postgres: r#"
ALTER TABLE tokens ADD COLUMN user_name TEXT COLLATE "C";
ALTER TABLE tokens ADD COLUMN scope TEXT COLLATE "C";
ALTER TABLE tokens ADD COLUMN role TEXT COLLATE "C";
ALTER TABLE tokens ADD COLUMN token_name TEXT COLLATE "C";
"#,
    },
    Upgrade {
        name: "the audit log and the VMs' residency trail",
        sqlite: r#"
-- Append-only: no statement of virt8ra updates a record, and this trigger
-- refuses any that tries; the one DELETE is the operator's retention
-- (`--audit-retention-days`), of records older than it. AUTOINCREMENT:
-- a sequence number is never handed out twice, also after a retention.
CREATE TABLE audit_log (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    resource TEXT NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log(at);
CREATE INDEX audit_log_resource ON audit_log(resource);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
-- Where each VM's data has been: written in the transaction of the VM
-- write that moved it, kept after the VM is deleted. `to_at` is set once,
-- when the interval closes.
CREATE TABLE vm_residency (
    vm_id   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    copy    TEXT NOT NULL,
    from_at TEXT NOT NULL,
    to_at   TEXT,
    body    TEXT NOT NULL,
    PRIMARY KEY (vm_id, seq)
) WITHOUT ROWID;
CREATE INDEX vm_residency_from ON vm_residency(from_at);
"#,
        postgres: r#"
CREATE TABLE audit_log (
    seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       TEXT COLLATE "C" NOT NULL,
    actor    TEXT COLLATE "C" NOT NULL,
    kind     TEXT COLLATE "C" NOT NULL,
    resource TEXT COLLATE "C" NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log(at);
CREATE INDEX audit_log_resource ON audit_log(resource);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TABLE vm_residency (
    vm_id   TEXT COLLATE "C" NOT NULL,
    seq     BIGINT NOT NULL,
    copy    TEXT COLLATE "C" NOT NULL,
    from_at TEXT COLLATE "C" NOT NULL,
    to_at   TEXT COLLATE "C",
    body    TEXT NOT NULL,
    PRIMARY KEY (vm_id, seq)
);
CREATE INDEX vm_residency_from ON vm_residency(from_at);
"#,
    },
];
