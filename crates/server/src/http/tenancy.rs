//! Tenants over HTTP: organisations, projects, users and their API tokens
//! (the rules are in [`crate::services::tenancy`]; who may call what is
//! in the route table and [`crate::http::auth`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use virt8ra_api::{
    ApiToken, ApiTokenCreate, ApiTokenInfo, Org, OrgCreate, Page, Project, ProjectCreate, Quota,
    QuotaReport, Role, User, UserCreate, Whoami,
};

use super::extract::Body;
use crate::error::{ApiResult, Kind};
use crate::http::auth::{Admin, Grant, ProjectAdmin, Reader, VmReader};
use crate::services::{quotas, tenancy};
use crate::state::Ctx;

fn page<T>(items: Vec<T>) -> Json<Page<T>> {
    Json(Page {
        items,
        next_cursor: None,
    })
}

#[utoipa::path(get, path = "/api/v1/whoami", tag = "tenants",
    responses((status = 200, body = Whoami), (status = 401, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
/// Who the token is: its user, scope and role.
pub async fn whoami(VmReader(c): VmReader) -> ApiResult<Json<Whoami>> {
    let (scope, role) = match &c.grant {
        Grant::Project { project, role } => (format!("project:{project}"), *role),
        Grant::Operator { provider } => (format!("provider:{provider}"), Role::Operator),
        _ => ("platform".to_string(), Role::Admin),
    };
    Ok(Json(Whoami {
        user: c.user,
        scope,
        role,
    }))
}

#[utoipa::path(get, path = "/api/v1/orgs", tag = "tenants",
    responses((status = 200, body = Page<Org>)), security(("bearer" = [])))]
pub async fn list_orgs(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Page<Org>>> {
    Ok(page(tenancy::orgs(&app).await?))
}

#[utoipa::path(post, path = "/api/v1/orgs", tag = "tenants", request_body = OrgCreate,
    responses((status = 201, body = Org), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_org(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<OrgCreate>,
) -> ApiResult<(StatusCode, Json<Org>)> {
    Ok((
        StatusCode::CREATED,
        Json(tenancy::create_org(&app, &req).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/orgs/{key}", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Org), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_org(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Org>> {
    Ok(Json(tenancy::org(&app, &key).await?))
}

#[utoipa::path(delete, path = "/api/v1/orgs/{key}", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "It still holds projects")),
    security(("bearer" = [])))]
pub async fn delete_org(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    tenancy::delete_org(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/projects", tag = "tenants",
    responses((status = 200, body = Page<Project>, description = "The projects the caller sees (a project token: its own)")),
    security(("bearer" = [])))]
pub async fn list_projects(
    Reader(c): Reader,
    State(app): State<Ctx>,
) -> ApiResult<Json<Page<Project>>> {
    Ok(page(tenancy::projects(&app, &c).await?))
}

#[utoipa::path(post, path = "/api/v1/projects", tag = "tenants", request_body = ProjectCreate,
    responses((status = 201, body = Project), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_project(
    _: Admin,
    State(app): State<Ctx>,
    Body(req): Body<ProjectCreate>,
) -> ApiResult<(StatusCode, Json<Project>)> {
    Ok((
        StatusCode::CREATED,
        Json(tenancy::create_project(&app, &req).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/projects/{key}", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = Project), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_project(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<Project>> {
    let p = tenancy::project(&app, &key).await?;
    c.check(&p.name, Kind::Other("project"), &key)?;
    Ok(Json(p))
}

#[utoipa::path(delete, path = "/api/v1/projects/{key}", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204, description = "Deleted, with its tokens"), (status = 404, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody, description = "It still owns resources (the message names one)")),
    security(("bearer" = [])))]
pub async fn delete_project(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    tenancy::delete_project(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/users", tag = "tenants",
    responses((status = 200, body = Page<User>)), security(("bearer" = [])))]
pub async fn list_users(_: Admin, State(app): State<Ctx>) -> ApiResult<Json<Page<User>>> {
    Ok(page(tenancy::users(&app).await?))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "tenants", request_body = UserCreate,
    responses((status = 201, body = User), (status = 400, body = virt8ra_api::ErrorBody),
              (status = 409, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_user(
    Admin(c): Admin,
    State(app): State<Ctx>,
    Body(req): Body<UserCreate>,
) -> ApiResult<(StatusCode, Json<User>)> {
    Ok((
        StatusCode::CREATED,
        Json(tenancy::create_user(&app, &c, &req).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/users/{key}", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = User), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_user(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(tenancy::user(&app, &key).await?))
}

#[utoipa::path(delete, path = "/api/v1/users/{key}", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 204, description = "Deleted, with its tokens and memberships"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_user(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    tenancy::delete_user(&app, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tenants",
    responses((status = 200, body = Page<ApiTokenInfo>, description = "The API tokens the caller manages (never their secrets)")),
    security(("bearer" = [])))]
pub async fn list_tokens(
    ProjectAdmin(c): ProjectAdmin,
    State(app): State<Ctx>,
) -> ApiResult<Json<Page<ApiTokenInfo>>> {
    Ok(page(tenancy::tokens(&app, &c).await?))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tenants", request_body = ApiTokenCreate,
    responses((status = 201, body = ApiToken, description = "The new token; its secret is shown here once"),
              (status = 400, body = virt8ra_api::ErrorBody), (status = 403, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    ProjectAdmin(c): ProjectAdmin,
    State(app): State<Ctx>,
    Body(req): Body<ApiTokenCreate>,
) -> ApiResult<(StatusCode, Json<ApiToken>)> {
    Ok((
        StatusCode::CREATED,
        Json(tenancy::create_token(&app, &c, &req).await?),
    ))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tenants",
    params(("id" = String, Path, description = "The token's id (not its secret)")),
    responses((status = 204, description = "Revoked: refused from now on"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    ProjectAdmin(c): ProjectAdmin,
    State(app): State<Ctx>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    tenancy::revoke_token(&app, &c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/projects/{key}/quota", tag = "tenants",
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = QuotaReport, description = "The quota and the use against each limit"),
              (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_quota(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Path(key): Path<String>,
) -> ApiResult<Json<QuotaReport>> {
    let p = tenancy::project(&app, &key).await?;
    c.check(&p.name, Kind::Other("project"), &key)?;
    Ok(Json(quotas::report(&app, &p.name)))
}

#[utoipa::path(put, path = "/api/v1/projects/{key}/quota", tag = "tenants", request_body = Quota,
    params(("key" = String, Path, description = "Name or id")),
    responses((status = 200, body = QuotaReport, description = "The new quota (it replaces the old one) and the use"),
              (status = 400, body = virt8ra_api::ErrorBody), (status = 404, body = virt8ra_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_quota(
    _: Admin,
    State(app): State<Ctx>,
    Path(key): Path<String>,
    Body(req): Body<Quota>,
) -> ApiResult<Json<QuotaReport>> {
    let p = tenancy::set_quota(&app, &key, req).await?;
    Ok(Json(quotas::report(&app, &p.name)))
}
