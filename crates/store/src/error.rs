//! The store's error: what a caller can act on (not found, conflict) and
//! the database failures, which keep their cause as the source so that it
//! reaches the logs whatever the backend.

use std::borrow::Cow;
use std::sync::Arc;

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
