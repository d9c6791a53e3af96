//! Extractors whose every rejection is our JSON error body, and helpers
//! handlers share to read a request.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::error::ApiError;

/// A JSON body whose every rejection has our error body: 413 when it is
/// larger than the body limit, 415 when its content type is not JSON, 400
/// for the rest (bad syntax, unknown field, wrong type).
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rej) => Err(match rej.status() {
                axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
                    "the JSON body is larger than the {} KiB this endpoint takes",
                    JSON_BODY_LIMIT >> 10
                )),
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
                    "the body must be JSON: send `Content-Type: application/json`".into(),
                ),
                _ => ApiError::Invalid(rej.body_text()),
            }),
        }
    }
}

/// The largest JSON body (and any body not streamed to disk) taken.
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;

/// Refuses a binary upload whose `Content-Type` says it is something else
/// (415). A missing one is taken as binary: the agent's chunked staging
/// uploads send none.
pub fn octet_stream(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("application/octet-stream") {
        return Ok(());
    }
    Err(ApiError::UnsupportedMediaType(format!(
        "the body is sent as {:?}; send the raw bytes as `Content-Type: application/octet-stream` \
         (with curl: --data-binary @FILE -H 'Content-Type: application/octet-stream')",
        String::from_utf8_lossy(ct.as_bytes())
    )))
}

/// Query parameters, with a 400 on anything malformed.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(rej) => Err(ApiError::Invalid(rej.body_text())),
        }
    }
}

/// A WebSocket upgrade; a request that is not one gets a 400 with our error
/// body (axum's own rejection is plain text).
pub struct Upgrade(pub WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match WebSocketUpgrade::from_request_parts(parts, state).await {
            Ok(ws) => Ok(Upgrade(ws)),
            Err(rej) => Err(ApiError::Invalid(format!(
                "this endpoint is a WebSocket: {}",
                rej.body_text()
            ))),
        }
    }
}

pub use crate::error::missing_ref;

/// A body of raw bytes (`application/octet-stream`), documented as a
/// binary string (`Vec<u8>` would be documented as an array of integers).
pub struct Binary;

impl PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl ToSchema for Binary {}
