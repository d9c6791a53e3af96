//! The control plane's domain error: what went wrong, in words a client
//! can act on, with the cause kept as a source where there is one.
//!
//! It knows nothing of HTTP: the HTTP layer maps each variant to a status
//! code and the JSON error body (`{"error": {"code", "message"}}`) in one
//! place ([`crate::http::error`]). Services, workflows and the registry
//! return it; the messages are the ones clients see.

use virt8ra_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names invalid values.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
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
            StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            // The whole chain: the message names what failed, its sources why.
            StoreError::Db { .. } => ApiError::Store(e),
        }
    }
}

/// Turns "not found" of a referenced resource into a 400 that says how to
/// find what exists.
pub fn missing_ref(kind: &str, name: &str, list_cmd: &str) -> ApiError {
    ApiError::Invalid(format!(
        "{kind} '{name}' not found; `virt8ra {list_cmd} list` shows what exists"
    ))
}
