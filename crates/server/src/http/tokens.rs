//! Token housekeeping: listing and revoking join tokens, purging the ones
//! that can admit no host any more, and rotating the admin token.
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

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use virt8ra_api::{AdminToken, JoinTokenInfo, Page};
use virt8ra_store::TokenKind;

use crate::error::{ApiError, ApiResult, Kind};
use crate::http::auth::{self, Admin};
use crate::state::Ctx;

/// How often expired join tokens are purged.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(600);

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

#[utoipa::path(get, path = "/api/v1/join-tokens", tag = "hosts",
    responses((status = 200, body = Page<JoinTokenInfo>,
               description = "Join tokens that can still admit a host (never their secrets)"),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_join_tokens(
    _: Admin,
    State(app): State<Ctx>,
) -> ApiResult<Json<Page<JoinTokenInfo>>> {
    app.store.purge_join_tokens(Utc::now()).await?;
    let items = app
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
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(delete, path = "/api/v1/join-tokens/{id}", tag = "hosts",
    params(("id" = String, Path, description = "The join token's id (not its secret)")),
    responses((status = 204, description = "Revoked: no host can join with it any more"),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_join_token(
    _: Admin,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if app.store.delete_token(TokenKind::Join, &id).await? {
        tracing::info!(token = %id, "join token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound {
            kind: Kind::JoinToken,
            name: id,
            hint: Some(
                " (used up, expired or revoked?); `virt8ra host join-token list` shows the live ones",
            ),
        })
    }
}

/// One rotation at a time, so that the file always holds the token the
/// database has.
static ROTATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[utoipa::path(post, path = "/api/v1/admin-token/rotate", tag = "system",
    responses((status = 200, body = AdminToken,
               description = "The new admin token, shown once (also written to DATA_DIR/admin.token); the old one is refused from now on"),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_admin_token(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<AdminToken>> {
    let _one = ROTATION.lock().await;
    let secret = auth::new_secret();
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
    let rec = auth::admin_record(&secret);
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
    Ok(Json(AdminToken { token: secret }))
}
