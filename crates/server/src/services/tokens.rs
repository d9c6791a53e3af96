//! Bearer tokens: making them, checking them, and their housekeeping.
//!
//! A token is `v8a_` followed by 64 hex characters of randomness. Only its
//! SHA-256 is stored; with 256 random bits a fast hash is enough (there is no
//! password to brute-force). Three kinds exist: the admin token (full API),
//! join tokens (register a host at one site, limited uses and lifetime) and
//! host tokens (one agent's channel and image downloads).
//!
//! A join token is deleted with its last use (in the join's transaction);
//! expired ones are purged when the control plane starts, every
//! [`PURGE_INTERVAL`] and before each listing, so the database keeps no
//! token that could never be used again. Listings show a token's id, site,
//! times and remaining uses, never its secret nor the secret's hash.
//!
//! Rotating the admin token replaces it in one transaction (the old one is
//! refused from the commit on, cached copies included) and rewrites
//! `DATA_DIR/admin.token` atomically, mode 0600. The new token is in the
//! answer, once.

use std::time::Duration;

use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use virt8ra_api::{JoinToken, JoinTokenCreate, JoinTokenInfo};
use virt8ra_store::{TokenKind, TokenRecord};

use crate::error::{missing_ref, ApiError, ApiResult, Kind};
use crate::state::Ctx;

/// How often expired join tokens are purged.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(600);

pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!("v8a_{}", hex::encode(b))
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn record(kind: TokenKind, secret: &str) -> TokenRecord {
    TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        kind,
        hash: hash(secret),
        site: None,
        host_id: None,
        expires_at: None,
        uses_left: None,
        created_at: Utc::now(),
        grant: None,
    }
}

/// The store's record of a new admin token `secret` (only its hash is kept).
pub fn admin_record(secret: &str) -> TokenRecord {
    record(TokenKind::Admin, secret)
}

/// The store's record of host `host_id`'s new token `secret`.
pub fn host_record(secret: &str, host_id: &str) -> TokenRecord {
    TokenRecord {
        host_id: Some(host_id.to_string()),
        ..record(TokenKind::Host, secret)
    }
}

/// Looks up a presented token; unknown and expired tokens are refused alike.
pub async fn authenticate(app: &Ctx, token: &str) -> ApiResult<TokenRecord> {
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

/// A new join token for an existing site (a missing one is a 400); its
/// secret is in the answer, once.
pub async fn create_join_token(app: &Ctx, req: &JoinTokenCreate) -> ApiResult<JoinToken> {
    virt8ra_api::validate::join_token(req).map_err(ApiError::Invalid)?;
    let site = app.store.get_site(&req.site).await.map_err(missing_ref)?;
    let secret = new_secret();
    let ttl = req.ttl_s.unwrap_or(3600);
    let max_uses = req.max_uses.unwrap_or(1);
    let expires_at = Utc::now() + chrono::Duration::seconds(ttl as i64);
    let rec = TokenRecord {
        site: Some(site.name.clone()),
        expires_at: Some(expires_at),
        uses_left: Some(max_uses),
        ..record(TokenKind::Join, &secret)
    };
    app.store.create_token(&rec).await?;
    Ok(JoinToken {
        id: rec.id,
        site: site.name,
        token: secret,
        expires_at,
        max_uses,
    })
}

/// Purges expired join tokens every [`PURGE_INTERVAL`], for as long as the
/// control plane runs.
pub async fn purge_periodically(app: Ctx) {
    loop {
        tokio::time::sleep(PURGE_INTERVAL).await;
        match app.store.purge_join_tokens(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired join tokens purged"),
            Err(e) => tracing::warn!(error = %e, "purging expired join tokens"),
        }
    }
}

/// The join tokens that can still admit a host (expired ones are purged
/// first), without their secrets.
pub async fn list_join_tokens(app: &Ctx) -> ApiResult<Vec<JoinTokenInfo>> {
    app.store.purge_join_tokens(Utc::now()).await?;
    Ok(app
        .store
        .list_tokens(TokenKind::Join)
        .await?
        .into_iter()
        .map(|t| JoinTokenInfo {
            id: t.id,
            site: t.site.unwrap_or_default(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            uses_left: t.uses_left,
        })
        .collect())
}

/// Revokes join token `id` (its id, not its secret).
pub async fn revoke_join_token(app: &Ctx, id: &str) -> ApiResult<()> {
    if app.store.delete_token(TokenKind::Join, id).await? {
        tracing::info!(token = %id, "join token revoked");
        Ok(())
    } else {
        Err(ApiError::NotFound {
            kind: Kind::JoinToken,
            name: id.to_string(),
            hint: Some(
                " (used up, expired or revoked?); `virt8ra host join-token list` shows the live ones",
            ),
        })
    }
}

/// Replaces the admin token with a new one, returned (its only copy but
/// `DATA_DIR/admin.token`). If the new file cannot be written, nothing
/// changes.
pub async fn rotate_admin_token(app: &Ctx) -> ApiResult<String> {
    // One at a time, so that the file always holds the database's token.
    let _one = app.token_rotation.lock().await;
    let secret = new_secret();
    let path = app.data_dir.join("admin.token");
    // The new file first, beside the old one: if it cannot be written,
    // nothing has changed.
    let staged = app.data_dir.join("admin.token.new");
    if let Err(e) = crate::keys::write_secret(&staged, &secret) {
        tracing::error!(error = %format!("{e:#}"), "admin token rotation: writing the new token file");
        return Err(ApiError::Internal(
            "the new admin token could not be saved; nothing changed (the control plane's log says why)"
                .into(),
        ));
    }
    let rec = admin_record(&secret);
    if let Err(e) = app.store.replace_tokens(&rec).await {
        let _ = std::fs::remove_file(&staged);
        return Err(e.into());
    }
    // The token works from the commit on; the answer is then its only
    // sure copy, so a failed rename is logged, not answered with an error.
    if let Err(e) = std::fs::rename(&staged, &path) {
        tracing::error!(error = %e, file = %path.display(),
            "admin token rotated, but its file was not replaced: the answer holds the new token");
    }
    tracing::info!("admin token rotated");
    Ok(secret)
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
