//! Token housekeeping: listing and revoking join tokens, and rotating the
//! admin token (the rules are in [`crate::services::tokens`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{AdminToken, JoinTokenInfo, Page};

use crate::error::ApiResult;
use crate::http::auth::Admin;
use crate::services::tokens;
use crate::state::Ctx;

#[utoipa::path(get, path = "/api/v1/join-tokens", tag = "hosts",
    responses((status = 200, body = Page<JoinTokenInfo>,
               description = "Join tokens that can still admit a host (never their secrets)"),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_join_tokens(
    _: Admin,
    State(app): State<Ctx>,
) -> ApiResult<Json<Page<JoinTokenInfo>>> {
    Ok(Json(Page {
        items: tokens::list_join_tokens(&app).await?,
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
    tokens::revoke_join_token(&app, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/admin-token/rotate", tag = "system",
    responses((status = 200, body = AdminToken,
               description = "The new admin token, shown once (also written to DATA_DIR/admin.token); the old one is refused from now on"),
              (status = 401, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_admin_token(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<AdminToken>> {
    Ok(Json(AdminToken {
        token: tokens::rotate_admin_token(&app).await?,
    }))
}
