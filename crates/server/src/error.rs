//! The control plane's domain error: what went wrong, in words a client
//! can act on, with the cause kept as a source where there is one.
//!
//! It knows nothing of HTTP: the HTTP layer maps each variant to a status
//! code and the JSON error body (`{"error": {"code", "message"}}`) in one
//! place ([`crate::http::error`]). Services, workflows and the registry
//! return it; the messages are the ones clients see.
//!
//! "Not found" is typed ([`ApiError::NotFound`], [`ApiError::BadRef`]): the
//! kind of resource ([`Kind`]) and its name are fields, so callers can tell
//! a missing VM from a missing host without reading the message, and the
//! message is written in one place (`{kind} '{name}' not found`).

use virt8ra_store::StoreError;

/// The kind of a resource that can be missing, as clients read it in a
/// message (`VM 'web' not found`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vm,
    Host,
    Site,
    Provider,
    Image,
    App,
    Network,
    JoinToken,
    Migration,
    Export,
    Catalog,
    Appliance,
    StagedDisk,
    /// A kind the store named that has no variant of its own yet (the
    /// store's kinds are words); its word is kept as is.
    Other(&'static str),
}

impl Kind {
    /// The word for the kind in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Vm => "VM",
            Kind::Host => "host",
            Kind::Site => "site",
            Kind::Provider => "provider",
            Kind::Image => "image",
            Kind::App => "app",
            Kind::Network => "network",
            Kind::JoinToken => "join token",
            Kind::Migration => "migration",
            Kind::Export => "export",
            Kind::Catalog => "catalog",
            Kind::Appliance => "appliance",
            Kind::StagedDisk => "staged disk",
            Kind::Other(s) => s,
        }
    }

    /// The CLI noun whose `list` shows what exists of this kind.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::JoinToken => "host join-token",
            Kind::StagedDisk => "migration",
            other => other.as_str(),
        }
    }

    /// The kind of a store's not-found (the store names kinds by their
    /// words: `VM`, `host`, ...).
    pub fn from_store(kind: &'static str) -> Kind {
        const KNOWN: [Kind; 13] = [
            Kind::Vm,
            Kind::Host,
            Kind::Site,
            Kind::Provider,
            Kind::Image,
            Kind::App,
            Kind::Network,
            Kind::JoinToken,
            Kind::Migration,
            Kind::Export,
            Kind::Catalog,
            Kind::Appliance,
            Kind::StagedDisk,
        ];
        KNOWN
            .into_iter()
            .find(|k| k.as_str() == kind)
            .unwrap_or(Kind::Other(kind))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names invalid values.
    #[error("{0}")]
    Invalid(String),
    /// The request names (in its body or query) a resource that does not
    /// exist: the request is wrong, not its path, so this is a 400 that
    /// says how to find what exists. `field` (e.g. `data_disks[0]`) says
    /// where the request named it, when that is not obvious.
    #[error(
        "{}{kind} '{name}' not found; `virt8ra {} list` shows what exists",
        .field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default(),
        .kind.noun()
    )]
    BadRef {
        field: Option<String>,
        kind: Kind,
        name: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The resource the request is about does not exist:
    /// `{kind} '{name}' not found`, then `hint` as written (how to find
    /// what exists, or why it may be gone), if there is one.
    #[error("{kind} '{name}' not found{}", .hint.unwrap_or_default())]
    NotFound {
        kind: Kind,
        name: String,
        hint: Option<&'static str>,
    },
    /// Something that is not a named resource is not there (an endpoint,
    /// a relay connection, the image of a published appliance): the
    /// message says what.
    #[error("{0}")]
    Missing(String),
    /// A uniqueness or state rule would be broken. Untyped: the store's
    /// conflicts are words, and so are the rules' (which name, which
    /// state).
    #[error("{0}")]
    Conflict(String),
    /// The method is not one the path takes (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than the endpoint takes (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body's `Content-Type` is not one the endpoint takes (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A dependency (an agent, a tool) is not available right now.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The store failed: its message says what it was doing, the source
    /// (kept, not flattened into a string) why.
    #[error("internal error: {}", .0.chain())]
    Store(#[source] StoreError),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, key } => ApiError::not_found(Kind::from_store(kind), key),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            // The whole chain: the message names what failed, its sources why.
            StoreError::Db { .. } => ApiError::Store(e),
        }
    }
}

impl ApiError {
    /// `{kind} '{name}' not found` (404).
    pub fn not_found(kind: Kind, name: impl Into<String>) -> Self {
        ApiError::NotFound {
            kind,
            name: name.into(),
            hint: None,
        }
    }

    /// Whether this is a 404 for a missing resource of `kind`.
    pub fn is_not_found(&self, kind: Kind) -> bool {
        matches!(self, ApiError::NotFound { kind: k, .. } if *k == kind)
    }
}

/// Turns "not found" of a referenced resource into a 400 that says how to
/// find what exists; any other error passes unchanged.
pub fn missing_ref(e: impl Into<ApiError>) -> ApiError {
    bad_ref(None, e.into())
}

/// [`missing_ref`] of a resource named in the request's `field`.
pub fn missing_ref_in(field: &str, e: impl Into<ApiError>) -> ApiError {
    bad_ref(Some(field.to_string()), e.into())
}

fn bad_ref(field: Option<String>, e: ApiError) -> ApiError {
    match e {
        ApiError::NotFound { kind, name, .. } => ApiError::BadRef { field, kind, name },
        other => other,
    }
}
