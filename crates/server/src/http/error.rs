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
