//! The one mapping of the domain error ([`crate::error::ApiError`]) to an
//! HTTP answer: its status code, and the JSON body
//! `{"error": {"code", "message"}}` whose code names the kind of failure.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use virt8ra_api::{ErrorBody, ErrorDetail};

use crate::error::ApiError;

/// The status and the error body's code of each kind of failure.
pub fn status_and_code(e: &ApiError) -> (StatusCode, &'static str) {
    match e {
        ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ApiError::UnsupportedMediaType(_) => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        }
        ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        ApiError::Internal(_) | ApiError::Store(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = status_and_code(&self);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt8ra_store::StoreError;

    /// A store failure is a 500 whose message is the whole cause, and the
    /// cause stays reachable as the error's source (not flattened).
    #[test]
    fn a_store_failure_is_a_500_that_keeps_its_cause() {
        let e: ApiError = StoreError::db("write VM", std::io::Error::other("disk full")).into();
        assert_eq!(
            status_and_code(&e),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        assert_eq!(
            e.to_string(),
            "internal error: database error: write VM: disk full"
        );
        let src = std::error::Error::source(&e).expect("the store error is kept");
        assert!(src.downcast_ref::<StoreError>().is_some());
        let cause = std::error::Error::source(src).map(|c| c.to_string());
        assert_eq!(cause.as_deref(), Some("disk full"));
    }

    /// What clients see of a store's not-found and conflict: 404 and 409
    /// with the store's words.
    #[test]
    fn not_found_and_conflict_keep_their_codes_and_words() {
        let e: ApiError = StoreError::not_found("VM", "web").into();
        assert_eq!(status_and_code(&e), (StatusCode::NOT_FOUND, "not_found"));
        assert_eq!(e.to_string(), "VM 'web' not found");
        let e: ApiError = StoreError::Conflict("name taken".into()).into();
        assert_eq!(status_and_code(&e), (StatusCode::CONFLICT, "conflict"));
        assert_eq!(e.to_string(), "name taken");
    }
}
