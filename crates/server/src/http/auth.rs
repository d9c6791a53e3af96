//! Bearer tokens.
//!
//! A token is `v8a_` followed by 64 hex characters of randomness. Only its
//! SHA-256 is stored; with 256 random bits a fast hash is enough (there is no
//! password to brute-force). Three kinds exist: the admin token (full API),
//! join tokens (register a host at one site, limited uses and lifetime) and
//! host tokens (one agent's channel and image downloads).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use virt8ra_store::{TokenKind, TokenRecord};

use crate::error::ApiError;
use crate::state::Ctx;

pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!("v8a_{}", hex::encode(b))
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

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

/// The store's record of a new admin token `secret` (only its hash is kept).
pub fn admin_record(secret: &str) -> TokenRecord {
    TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        kind: TokenKind::Admin,
        hash: hash(secret),
        site: None,
        host_id: None,
        expires_at: None,
        uses_left: None,
        created_at: Utc::now(),
    }
}

/// Looks up a presented token; unknown and expired tokens are refused alike.
pub async fn authenticate(app: &Ctx, token: &str) -> Result<TokenRecord, ApiError> {
    let rec = app
        .store
        .find_token(&hash(token))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
    if let Some(exp) = rec.expires_at {
        if exp < Utc::now() {
            return Err(ApiError::Unauthorized("token expired".into()));
        }
    }
    Ok(rec)
}

async fn require(parts: &Parts, app: &Ctx, kinds: &[TokenKind]) -> Result<TokenRecord, ApiError> {
    let token = bearer(parts)?;
    let rec = authenticate(app, token).await?;
    if kinds.contains(&rec.kind) {
        Ok(rec)
    } else {
        Err(ApiError::Forbidden(format!(
            "a {} token cannot do this",
            rec.kind.as_str()
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_hashes_stable() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with("v8a_") && a.len() == 68);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a).len(), 64);
    }
}
