//! Bearer tokens as extractors: each reads `Authorization: Bearer TOKEN`
//! and admits the kinds of token its endpoints take (the tokens themselves,
//! and how they are checked, are [`crate::services::tokens`]'s).

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use virt8ra_api::AuditActor;
use virt8ra_store::{TokenKind, TokenRecord};

use crate::error::ApiError;
use crate::services::tokens;
use crate::state::Ctx;

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let h = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "missing bearer token: send 'Authorization: Bearer TOKEN' (the CLI reads VIRT8RA_TOKEN)"
                    .into(),
            )
        })?;
    let s = h
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    s.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("Authorization header must be 'Bearer TOKEN'".into()))
}

async fn require(parts: &Parts, app: &Ctx, kinds: &[TokenKind]) -> Result<TokenRecord, ApiError> {
    let token = bearer(parts)?;
    let rec = tokens::authenticate(app, token).await?;
    if let Some(slot) = parts.extensions.get::<ActorSlot>() {
        slot.set(&rec); // the audit log's actor
    }
    if kinds.contains(&rec.kind) {
        Ok(rec)
    } else {
        Err(ApiError::Forbidden(format!(
            "a {} token cannot do this",
            rec.kind.as_str()
        )))
    }
}

/// Who made the call: the audit middleware (`http::audit`) puts one in
/// each changing request, and [`require`] fills it.
#[derive(Clone, Default)]
pub struct ActorSlot(Arc<Mutex<Option<AuditActor>>>);

impl ActorSlot {
    /// Records the token the call presented.
    pub fn set(&self, t: &TokenRecord) {
        let actor = AuditActor {
            token_id: Some(t.id.clone()),
            token_kind: Some(t.kind.as_str().to_string()),
            host_id: t.host_id.clone().filter(|_| t.kind == TokenKind::Host),
            user: None,
            project: None,
        };
        if let Ok(mut a) = self.0.lock() {
            *a = Some(actor);
        }
    }

    /// Who it was (nobody, when no valid token was presented).
    pub fn take(&self) -> AuditActor {
        self.0
            .lock()
            .ok()
            .and_then(|mut a| a.take())
            .unwrap_or_default()
    }
}

/// An operator holding the admin token.
pub struct Admin;

impl FromRequestParts<Ctx> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        require(parts, app, &[TokenKind::Admin]).await?;
        Ok(Admin)
    }
}

/// An agent, by its host credential.
pub struct HostAuth {
    pub host_id: String,
}

impl FromRequestParts<Ctx> for HostAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        let rec = require(parts, app, &[TokenKind::Host]).await?;
        let host_id = rec
            .host_id
            .ok_or_else(|| ApiError::Internal("host token without host".into()))?;
        Ok(HostAuth { host_id })
    }
}

/// A joining agent, by its join token.
pub struct JoinAuth(pub TokenRecord);

impl FromRequestParts<Ctx> for JoinAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        let rec = require(parts, app, &[TokenKind::Join]).await?;
        if rec.uses_left == Some(0) {
            return Err(ApiError::Unauthorized("join token is used up".into()));
        }
        Ok(JoinAuth(rec))
    }
}

/// Either the admin or a host (image downloads).
pub struct AdminOrHost(pub Option<String>);

impl FromRequestParts<Ctx> for AdminOrHost {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        let rec = require(parts, app, &[TokenKind::Admin, TokenKind::Host]).await?;
        Ok(AdminOrHost(rec.host_id))
    }
}
