//! The control plane's durable state.
//!
//! [`Store`] is the seam between the control plane and its database. The
//! embedded SQLite backend ([`SqliteStore`]) is the zero-set-up default; a
//! PostgreSQL backend implements the same trait. Every method that changes
//! state returns only after the change is committed durably (SQLite in WAL
//! mode with `synchronous=FULL`), so an acknowledged API write survives a
//! SIGKILL of the control plane at any moment.
//!
//! Rows keep a few indexed columns (id, name, foreign keys, phase) for lookups
//! and constraints, and the whole resource as JSON in `body`, so adding a field
//! to a resource needs no schema migration; schema changes that do need one are
//! numbered migrations in [`schema`].

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use virt8ra_api::{Host, Image, Migration, Provider, Site, Vm, VmEvent, VmExport, VmPhase};

mod cached;
pub mod schema;
mod sqlite;

pub use cached::CachedStore;
pub use sqlite::SqliteStore;

/// The cause of a [`StoreError::Db`]: the backend's own error (rusqlite's,
/// an I/O error, or a store error it wraps). Shared, so that one failed
/// commit can fail every write of its batch with the same cause; not tied
/// to SQLite, so that another backend can give its driver's errors.
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Clone)]
pub enum StoreError {
    /// `{kind} '{key}' not found`
    NotFound { kind: &'static str, key: String },
    /// A uniqueness or reference rule would be broken.
    Conflict(String),
    /// The database failed, or holds what this build cannot read: `op` says
    /// what the store was doing, `source` (when there is one) why; the
    /// message does not repeat the source ([`StoreError::chain`] joins them).
    Db {
        op: Cow<'static, str>,
        source: Option<ErrorSource>,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NotFound { kind, key } => write!(f, "{kind} '{key}' not found"),
            StoreError::Conflict(m) => f.write_str(m),
            StoreError::Db { op, .. } => write!(f, "database error: {op}"),
        }
    }
}

/// By hand rather than derived: the source is the backend's error itself
/// (a `rusqlite::Error` downcasts as one), not the `Arc` that shares it.
impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Db {
                source: Some(s), ..
            } => Some(&**s),
            _ => None,
        }
    }
}

impl StoreError {
    pub fn not_found(kind: &'static str, key: impl Into<String>) -> Self {
        StoreError::NotFound {
            kind,
            key: key.into(),
        }
    }

    /// A database failure while doing `op`, caused by `source`.
    pub fn db(
        op: impl Into<Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Db {
            op: op.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A database failure that has no underlying error (e.g. a row this
    /// build cannot read): `what` says all there is.
    pub fn db_failure(what: impl Into<Cow<'static, str>>) -> Self {
        StoreError::Db {
            op: what.into(),
            source: None,
        }
    }

    /// This error and its causes, outermost first, joined by ": " (for logs
    /// and 500 answers, which need the cause the message leaves out).
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Full access to the API.
    Admin,
    /// May register one (or `uses_left`) host at `site`.
    Join,
    /// The credential of one host's agent.
    Host,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Join => "join",
            TokenKind::Host => "host",
        }
    }
    pub fn parse(s: &str) -> Option<TokenKind> {
        Some(match s {
            "admin" => TokenKind::Admin,
            "join" => TokenKind::Join,
            "host" => TokenKind::Host,
            _ => return None,
        })
    }
}

/// A stored token: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub kind: TokenKind,
    pub hash: String,
    /// Site name (join tokens).
    pub site: Option<String>,
    /// Host id (host tokens).
    pub host_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub uses_left: Option<u32>,
    pub created_at: DateTime<Utc>,
}

/// Filters for listing VMs. `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub host_id: Option<String>,
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    pub phase: Option<VmPhase>,
    /// Include VMs in phase `deleted` (default: no).
    pub include_deleted: bool,
    /// Return VMs whose id sorts after this one (cursor pagination).
    pub after_id: Option<String>,
    pub limit: Option<usize>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // providers
    async fn create_provider(&self, p: &Provider) -> Result<()>;
    async fn list_providers(&self) -> Result<Vec<Provider>>;
    /// By id or name.
    async fn get_provider(&self, key: &str) -> Result<Provider>;
    /// Refused while sites belong to it.
    async fn delete_provider(&self, id: &str) -> Result<()>;
    /// Replaces the provider's body (its id and name do not change).
    async fn update_provider(&self, p: &Provider) -> Result<()>;

    // sites
    async fn create_site(&self, s: &Site) -> Result<()>;
    async fn list_sites(&self) -> Result<Vec<Site>>;
    async fn get_site(&self, key: &str) -> Result<Site>;
    /// Refused while hosts belong to it.
    async fn delete_site(&self, id: &str) -> Result<()>;
    /// Replaces the site's body (its id, name and provider do not change).
    async fn update_site(&self, s: &Site) -> Result<()>;

    // hosts
    /// Creates the host and its credential in one transaction, and consumes
    /// one use of the join token that admitted it.
    async fn create_host(
        &self,
        h: &Host,
        host_token: &TokenRecord,
        join_token_id: &str,
    ) -> Result<()>;
    async fn update_host(&self, h: &Host) -> Result<()>;
    async fn list_hosts(&self) -> Result<Vec<Host>>;
    async fn get_host(&self, key: &str) -> Result<Host>;
    /// Deletes the host and revokes its tokens. The caller has checked
    /// that no VM is placed on it (the store has no index of VMs by host;
    /// the control plane checks its in-memory index and placement engine).
    async fn delete_host(&self, id: &str) -> Result<()>;

    // images
    async fn create_image(&self, i: &Image) -> Result<()>;
    async fn list_images(&self) -> Result<Vec<Image>>;
    async fn get_image(&self, key: &str) -> Result<Image>;
    /// Refused while VMs that are not deleted use it.
    async fn delete_image(&self, id: &str) -> Result<()>;
    /// Replaces the image's record (its name and content stay).
    async fn update_image(&self, i: &Image) -> Result<()>;

    // VMs
    /// Creates the VM with its first events (e.g. created, then scheduled
    /// when it was placed at once), in one transaction.
    async fn create_vm(&self, vm: &Vm, events: &[&str]) -> Result<()>;
    /// Replaces the VM; appends an event when `event` is given (atomically).
    async fn update_vm(&self, vm: &Vm, event: Option<&str>) -> Result<()>;
    async fn get_vm(&self, key: &str) -> Result<Vm>;
    async fn list_vms(&self, f: &VmFilter) -> Result<Vec<Vm>>;
    async fn vm_events(&self, vm_id: &str) -> Result<Vec<VmEvent>>;

    // migrations
    /// Creates the migration and stores the VM (which names it) in one
    /// transaction; refused while another migration of the VM is active.
    async fn create_migration(&self, m: &Migration, vm: &Vm, event: &str) -> Result<()>;
    /// Replaces the migration, and the VM with it when given (atomically),
    /// appending `event` to the VM's events.
    async fn update_migration(
        &self,
        m: &Migration,
        vm: Option<&Vm>,
        event: Option<&str>,
    ) -> Result<()>;
    async fn get_migration(&self, id: &str) -> Result<Migration>;
    /// Oldest first; of one VM when `vm_id` is given; only unfinished ones
    /// when `active`.
    async fn list_migrations(&self, vm_id: Option<&str>, active: bool) -> Result<Vec<Migration>>;

    // exports
    async fn put_export(&self, e: &VmExport) -> Result<()>;
    async fn get_export(&self, id: &str) -> Result<VmExport>;

    // tokens
    async fn create_token(&self, t: &TokenRecord) -> Result<()>;
    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;
    async fn count_tokens(&self, kind: TokenKind) -> Result<usize>;
    /// Every token of a kind, oldest first.
    async fn list_tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>>;
    /// Deletes the token `id` if it is of `kind`; whether it existed.
    async fn delete_token(&self, kind: TokenKind, id: &str) -> Result<bool>;
    /// Deletes the join tokens that can admit no host any more: used up,
    /// or expired before `now`. Returns how many went.
    async fn purge_join_tokens(&self, now: DateTime<Utc>) -> Result<usize>;
    /// Replaces every token of `t.kind` with `t`, in one transaction (the
    /// admin token's rotation: the old one stops working at the commit).
    async fn replace_tokens(&self, t: &TokenRecord) -> Result<()>;

    // documents: resources kept whole as JSON under a kind, with a unique
    // name per kind (catalogs, appliances, apps)
    /// Creates the document, or replaces the one with this id; a different
    /// document of the same kind and name is a conflict.
    async fn put_doc(&self, kind: &str, id: &str, name: &str, body: &str) -> Result<()>;
    /// The body, by id or name.
    async fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>>;
    /// All bodies of a kind, by name.
    async fn list_docs(&self, kind: &str) -> Result<Vec<String>>;
    /// Whether it existed.
    async fn delete_doc(&self, kind: &str, id: &str) -> Result<bool>;
}
