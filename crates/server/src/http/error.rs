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
        ApiError::BadRef { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
        ApiError::NotFound { .. } | ApiError::Missing(_) => (StatusCode::NOT_FOUND, "not_found"),
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
    use crate::error::{missing_ref, missing_ref_in, Kind};
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

    /// Every variant maps to its status and code: the one table clients
    /// depend on (a change here changes the API).
    #[test]
    fn each_variant_has_its_status_and_code() {
        let s = || "m".to_string();
        let cases: Vec<(ApiError, StatusCode, &str)> = vec![
            (
                ApiError::Invalid(s()),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                ApiError::BadRef {
                    field: None,
                    kind: Kind::Site,
                    name: s(),
                },
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                ApiError::Unauthorized(s()),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (ApiError::Forbidden(s()), StatusCode::FORBIDDEN, "forbidden"),
            (
                ApiError::not_found(Kind::Vm, "x"),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (ApiError::Missing(s()), StatusCode::NOT_FOUND, "not_found"),
            (ApiError::Conflict(s()), StatusCode::CONFLICT, "conflict"),
            (
                ApiError::MethodNotAllowed(s()),
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (
                ApiError::PayloadTooLarge(s()),
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType(s()),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
            (
                ApiError::Unavailable(s()),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                ApiError::Internal(s()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                StoreError::db_failure("x").into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(status_and_code(&e), (status, code), "{e:?}");
        }
    }

    /// A store's not-found becomes the typed one, of the right kind, with
    /// the store's words; every kind the store names is one of ours.
    #[test]
    fn a_store_not_found_is_typed_with_the_same_words() {
        for (word, kind) in [
            ("VM", Kind::Vm),
            ("host", Kind::Host),
            ("site", Kind::Site),
            ("provider", Kind::Provider),
            ("image", Kind::Image),
            ("network", Kind::Network),
            ("migration", Kind::Migration),
            ("export", Kind::Export),
        ] {
            let e: ApiError = StoreError::not_found(word, "k").into();
            assert!(e.is_not_found(kind), "{word}: {e:?}");
            assert_eq!(e.to_string(), format!("{word} 'k' not found"));
        }
        let e: ApiError = StoreError::not_found("widget", "w").into();
        assert!(e.is_not_found(Kind::Other("widget")), "{e:?}");
        assert_eq!(e.to_string(), "widget 'w' not found");
    }

    /// A referenced resource that is missing is a 400 that names it and
    /// says how to list what exists; other errors pass through.
    #[test]
    fn a_missing_reference_is_a_400_that_says_how_to_list() {
        let e = missing_ref(StoreError::not_found("provider", "ghost"));
        assert_eq!(
            status_and_code(&e),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );
        assert_eq!(
            e.to_string(),
            "provider 'ghost' not found; `virt8ra provider list` shows what exists"
        );
        let e = missing_ref_in("data_disks[1]", StoreError::not_found("image", "d"));
        assert_eq!(
            e.to_string(),
            "data_disks[1]: image 'd' not found; `virt8ra image list` shows what exists"
        );
        let e = missing_ref(ApiError::not_found(Kind::Vm, "web"));
        assert_eq!(
            e.to_string(),
            "VM 'web' not found; `virt8ra vm list` shows what exists"
        );
        let e = missing_ref(StoreError::db_failure("disk gone"));
        assert_eq!(
            status_and_code(&e),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        let e = ApiError::NotFound {
            kind: Kind::JoinToken,
            name: "t1".into(),
            hint: Some(" (revoked?)"),
        };
        assert_eq!(e.to_string(), "join token 't1' not found (revoked?)");
    }
}
