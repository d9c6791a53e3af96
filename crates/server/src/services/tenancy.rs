//! Tenants: organisations, projects, users and their API tokens.
//!
//! Organisations, projects and users are documents in the store (kinds
//! `org`, `project`, `user`; names unique per kind, as the store keeps
//! them). A project lists its members and their roles; a user lists the
//! providers it operates. A user token is a token of kind `user` whose
//! grant (owner, scope, role, name) the store keeps beside the hash, so
//! authenticating one is the one indexed read every token takes: deleting
//! a user or a project deletes its tokens, revoking one deletes it, and
//! from then on it is refused (401) like any unknown token.
//!
//! Read-modify-writes of these documents (a membership added by a token,
//! a delete that checks what is left) run one at a time under
//! [`TENANCY_LOCK`]: they are rare, and one lock keeps them simple.

use chrono::Utc;
use virt8ra_api::{
    ApiToken, ApiTokenCreate, ApiTokenInfo, Member, Org, OrgCreate, Project, ProjectCreate, Quota,
    Role, User, UserCreate, DEFAULT_ORG, DEFAULT_PROJECT,
};
use virt8ra_store::{Store, TokenGrant, TokenKind, TokenRecord, VmFilter};

use crate::error::{missing_ref, ApiError, ApiResult, Kind};
use crate::services::access::{Caller, Grant};
use crate::services::tokens::{hash, new_secret};
use crate::state::Ctx;

const ORG: &str = "org";
const PROJECT: &str = "project";
const USER: &str = "user";
/// The longest lifetime a token may be given (ten years).
const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

static TENANCY_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kind(k: &'static str) -> Kind {
    Kind::Other(k)
}

fn to_json<T: serde::Serialize>(v: &T) -> ApiResult<String> {
    serde_json::to_string(v).map_err(|e| ApiError::Internal(format!("encoding: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> ApiResult<T> {
    serde_json::from_str(s).map_err(|e| ApiError::Internal(format!("corrupt document: {e}")))
}

async fn get<T: serde::de::DeserializeOwned>(
    app: &Ctx,
    k: &'static str,
    key: &str,
) -> ApiResult<T> {
    match app.store.get_doc(k, key).await? {
        Some(body) => from_json(&body),
        None => Err(ApiError::not_found(kind(k), key)),
    }
}

async fn list<T: serde::de::DeserializeOwned>(app: &Ctx, k: &'static str) -> ApiResult<Vec<T>> {
    app.store
        .list_docs(k)
        .await?
        .iter()
        .map(|b| from_json(b))
        .collect()
}

/// Makes the `default` organisation and project if they are missing: the
/// owner of what the admin creates without picking a project, and of
/// everything made before tenants existed.
pub async fn ensure_default(store: &dyn Store) -> anyhow::Result<()> {
    let now = Utc::now();
    if store.get_doc(ORG, DEFAULT_ORG).await?.is_none() {
        let o = Org {
            id: uuid::Uuid::new_v4().to_string(),
            name: DEFAULT_ORG.into(),
            created_at: now,
        };
        store
            .put_doc(ORG, &o.id, &o.name, &serde_json::to_string(&o)?)
            .await?;
    }
    if store.get_doc(PROJECT, DEFAULT_PROJECT).await?.is_none() {
        let p = Project {
            id: uuid::Uuid::new_v4().to_string(),
            name: DEFAULT_PROJECT.into(),
            org: DEFAULT_ORG.into(),
            members: vec![],
            quota: Default::default(),
            created_at: now,
        };
        store
            .put_doc(PROJECT, &p.id, &p.name, &serde_json::to_string(&p)?)
            .await?;
    }
    Ok(())
}

/// Every project's quota, for the in-memory registry.
pub async fn load_quotas(store: &dyn Store) -> anyhow::Result<crate::registry::quotas::Quotas> {
    let mut out = Vec::new();
    for body in store.list_docs(PROJECT).await? {
        let p: Project = serde_json::from_str(&body)?;
        out.push((p.name, p.quota));
    }
    Ok(crate::registry::quotas::Quotas::load(out))
}

/// Sets project `key`'s quota (replacing the old one; an empty one
/// removes every limit). Lowering a limit below the use refuses nothing
/// that exists; new VMs are refused until the use is under it.
pub async fn set_quota(app: &Ctx, key: &str, q: Quota) -> ApiResult<Project> {
    for c in q.countries.keys() {
        virt8ra_api::validate::country(c)
            .map_err(|e| ApiError::Invalid(format!("quota countries: {e}")))?;
    }
    let _one = TENANCY_LOCK.lock().await;
    let mut p = project(app, key).await?;
    p.quota = q;
    app.store
        .put_doc(PROJECT, &p.id, &p.name, &to_json(&p)?)
        .await?;
    app.quotas.set(&p.name, p.quota.clone());
    Ok(p)
}

// organisations

pub async fn create_org(app: &Ctx, req: &OrgCreate) -> ApiResult<Org> {
    virt8ra_api::validate::name("org", &req.name).map_err(ApiError::Invalid)?;
    let o = Org {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name.clone(),
        created_at: Utc::now(),
    };
    app.store
        .put_doc(ORG, &o.id, &o.name, &to_json(&o)?)
        .await?;
    Ok(o)
}

pub async fn orgs(app: &Ctx) -> ApiResult<Vec<Org>> {
    list(app, ORG).await
}

pub async fn org(app: &Ctx, key: &str) -> ApiResult<Org> {
    get(app, ORG, key).await
}

/// Refused while projects belong to it.
pub async fn delete_org(app: &Ctx, key: &str) -> ApiResult<()> {
    let _one = TENANCY_LOCK.lock().await;
    let o = org(app, key).await?;
    let projects: Vec<Project> = list(app, PROJECT).await?;
    if let Some(p) = projects.iter().find(|p| p.org == o.name) {
        return Err(ApiError::Conflict(format!(
            "org '{}' still holds project '{}': delete its projects first",
            o.name, p.name
        )));
    }
    app.store.delete_doc(ORG, &o.id).await?;
    Ok(())
}

// projects

pub async fn create_project(app: &Ctx, req: &ProjectCreate) -> ApiResult<Project> {
    virt8ra_api::validate::name("project", &req.name).map_err(ApiError::Invalid)?;
    let org_key = req.org.as_deref().unwrap_or(DEFAULT_ORG);
    let o = org(app, org_key).await.map_err(missing_ref)?;
    let p = Project {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name.clone(),
        org: o.name,
        members: vec![],
        quota: Default::default(),
        created_at: Utc::now(),
    };
    app.store
        .put_doc(PROJECT, &p.id, &p.name, &to_json(&p)?)
        .await?;
    Ok(p)
}

/// The projects the caller sees (a project token: its own).
pub async fn projects(app: &Ctx, c: &Caller) -> ApiResult<Vec<Project>> {
    let all: Vec<Project> = list(app, PROJECT).await?;
    Ok(all.into_iter().filter(|p| c.sees(&p.name)).collect())
}

pub async fn project(app: &Ctx, key: &str) -> ApiResult<Project> {
    get(app, PROJECT, key).await
}

/// Refused while the project owns VMs (not deleted), apps, networks or
/// images; its tokens go with it.
pub async fn delete_project(app: &Ctx, key: &str) -> ApiResult<()> {
    let _one = TENANCY_LOCK.lock().await;
    let p = project(app, key).await?;
    if p.name == DEFAULT_PROJECT {
        return Err(ApiError::Conflict(
            "the default project cannot be deleted: it owns what is created without a project"
                .into(),
        ));
    }
    let owned = owned_resource(app, &p.name).await?;
    if let Some(what) = owned {
        return Err(ApiError::Conflict(format!(
            "project '{}' still owns {what}: delete it first",
            p.name
        )));
    }
    let scope = format!("project:{}", p.name);
    delete_tokens_where(app, |g| g.scope == scope).await?;
    app.store.delete_doc(PROJECT, &p.id).await?;
    Ok(())
}

/// One resource the project owns, in words, if it owns any.
async fn owned_resource(app: &Ctx, project: &str) -> ApiResult<Option<String>> {
    let vms = app.vms.list(&VmFilter {
        project: Some(project.into()),
        limit: Some(1),
        ..Default::default()
    });
    if let Some(v) = vms.first() {
        return Ok(Some(format!("VM '{}'", v.name)));
    }
    if let Some(n) = app
        .store
        .list_networks()
        .await?
        .into_iter()
        .find(|n| n.project == project)
    {
        return Ok(Some(format!("network '{}'", n.name)));
    }
    if let Some(i) = app
        .store
        .list_images()
        .await?
        .into_iter()
        .find(|i| i.project.as_deref() == Some(project))
    {
        return Ok(Some(format!("image '{}'", i.name)));
    }
    for a in crate::services::apps::list(app).await? {
        if a.project == project {
            return Ok(Some(format!("app '{}'", a.name)));
        }
    }
    Ok(None)
}

// users

pub async fn create_user(app: &Ctx, c: &Caller, req: &UserCreate) -> ApiResult<User> {
    virt8ra_api::validate::name("user", &req.name).map_err(ApiError::Invalid)?;
    if req.platform_admin && !c.is_platform() {
        return Err(ApiError::Forbidden(
            "only a platform admin can make a platform admin".into(),
        ));
    }
    let u = User {
        id: uuid::Uuid::new_v4().to_string(),
        name: req.name.clone(),
        operator_of: vec![],
        platform_admin: req.platform_admin,
        created_at: Utc::now(),
    };
    app.store
        .put_doc(USER, &u.id, &u.name, &to_json(&u)?)
        .await?;
    Ok(u)
}

pub async fn users(app: &Ctx) -> ApiResult<Vec<User>> {
    list(app, USER).await
}

pub async fn user(app: &Ctx, key: &str) -> ApiResult<User> {
    get(app, USER, key).await
}

/// Deletes the user, its tokens and its memberships.
pub async fn delete_user(app: &Ctx, key: &str) -> ApiResult<()> {
    let _one = TENANCY_LOCK.lock().await;
    let u = user(app, key).await?;
    delete_tokens_where(app, |g| g.user == u.name).await?;
    let projects: Vec<Project> = list(app, PROJECT).await?;
    for mut p in projects {
        let before = p.members.len();
        p.members.retain(|m| m.user != u.name);
        if p.members.len() != before {
            app.store
                .put_doc(PROJECT, &p.id, &p.name, &to_json(&p)?)
                .await?;
        }
    }
    app.store.delete_doc(USER, &u.id).await?;
    Ok(())
}

async fn delete_tokens_where(app: &Ctx, pick: impl Fn(&TokenGrant) -> bool) -> ApiResult<()> {
    for t in app.store.list_tokens(TokenKind::User).await? {
        if t.grant.as_ref().is_some_and(&pick) {
            app.store.delete_token(TokenKind::User, &t.id).await?;
        }
    }
    Ok(())
}

// tokens

/// What a new token's scope and role are, checked against the caller's
/// own rights: a project admin makes tokens of its own project only.
async fn token_scope(
    app: &Ctx,
    c: &Caller,
    req: &ApiTokenCreate,
    u: &User,
) -> ApiResult<(String, Role)> {
    match (&req.project, &req.provider) {
        (Some(_), Some(_)) => Err(ApiError::Invalid(
            "a token is scoped to a project or to a provider, not both".into(),
        )),
        (Some(p), None) => {
            let role = req.role.unwrap_or(Role::Member);
            if role == Role::Operator {
                return Err(ApiError::Invalid(
                    "role operator is for provider tokens (--provider); a project token is viewer, member or admin"
                        .into(),
                ));
            }
            let p = project(app, p).await.map_err(missing_ref)?;
            if !c.sees(&p.name) {
                return Err(ApiError::BadRef {
                    field: Some("project".into()),
                    kind: kind("project"),
                    name: p.name,
                });
            }
            Ok((format!("project:{}", p.name), role))
        }
        (None, Some(prov)) => {
            if !c.is_platform() {
                return Err(ApiError::Forbidden(
                    "only a platform admin can make a provider operator's token".into(),
                ));
            }
            if req.role.is_some_and(|r| r != Role::Operator) {
                return Err(ApiError::Invalid(
                    "a provider token's role is operator".into(),
                ));
            }
            let p = app.store.get_provider(prov).await.map_err(missing_ref)?;
            Ok((format!("provider:{}", p.name), Role::Operator))
        }
        (None, None) => {
            if !c.is_platform() || !u.platform_admin {
                return Err(ApiError::Invalid(format!(
                    "a token needs --project or --provider (a platform token is for platform admins only, and '{}' is not one or you are not)",
                    u.name
                )));
            }
            if req.role.is_some_and(|r| r != Role::Admin) {
                return Err(ApiError::Invalid("a platform token's role is admin".into()));
            }
            Ok(("platform".into(), Role::Admin))
        }
    }
}

/// Makes a token for a user; the secret is in the answer, once. A project
/// token makes its user a member of the project with at least its role; a
/// provider token makes its user an operator of the provider.
pub async fn create_token(app: &Ctx, c: &Caller, req: &ApiTokenCreate) -> ApiResult<ApiToken> {
    let _one = TENANCY_LOCK.lock().await;
    let mut u = user(app, &req.user).await.map_err(missing_ref)?;
    let (scope, role) = token_scope(app, c, req, &u).await?;
    if let Some(ttl) = req.ttl_s {
        if !(1..=MAX_TTL_S).contains(&ttl) {
            return Err(ApiError::Invalid(format!(
                "ttl_s {ttl} is outside 1..{MAX_TTL_S} (a second to ten years)"
            )));
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("token-{}", &id[..8]));
    if name.is_empty() || name.len() > 63 {
        return Err(ApiError::Invalid(
            "a token's name is 1-63 characters".into(),
        ));
    }
    let secret = new_secret();
    let expires_at = req
        .ttl_s
        .map(|s| Utc::now() + chrono::Duration::seconds(s as i64));
    let rec = TokenRecord {
        id: id.clone(),
        kind: TokenKind::User,
        hash: hash(&secret),
        site: None,
        host_id: None,
        expires_at,
        uses_left: None,
        created_at: Utc::now(),
        grant: Some(TokenGrant {
            user: u.name.clone(),
            scope: scope.clone(),
            role: role.as_str().into(),
            name: name.clone(),
        }),
    };
    record_membership(app, &mut u, &scope, role).await?;
    app.store.create_token(&rec).await?;
    tracing::info!(token = %id, user = %u.name, %scope, role = role.as_str(), "API token created");
    Ok(ApiToken {
        id,
        user: u.name,
        scope,
        role,
        name,
        token: secret,
        expires_at,
    })
}

async fn record_membership(app: &Ctx, u: &mut User, scope: &str, role: Role) -> ApiResult<()> {
    match scope.split_once(':') {
        Some(("project", p)) => {
            let mut p = project(app, p).await?;
            match p.members.iter_mut().find(|m| m.user == u.name) {
                Some(m) if m.role >= role => return Ok(()),
                Some(m) => m.role = role,
                None => p.members.push(Member {
                    user: u.name.clone(),
                    role,
                }),
            }
            app.store
                .put_doc(PROJECT, &p.id, &p.name, &to_json(&p)?)
                .await?;
        }
        Some(("provider", prov)) if !u.operator_of.iter().any(|x| x == prov) => {
            u.operator_of.push(prov.to_string());
            app.store
                .put_doc(USER, &u.id, &u.name, &to_json(u)?)
                .await?;
        }
        _ => {}
    }
    Ok(())
}

fn info(t: TokenRecord) -> Option<ApiTokenInfo> {
    let g = t.grant?;
    Some(ApiTokenInfo {
        id: t.id,
        user: g.user,
        scope: g.scope,
        role: Role::parse(&g.role)?,
        name: g.name,
        created_at: t.created_at,
        expires_at: t.expires_at,
    })
}

/// Whether the caller may see (and revoke) a token of `scope`: platform
/// admins every token, project admins their project's.
fn manages(c: &Caller, scope: &str) -> bool {
    match &c.grant {
        Grant::Platform => true,
        Grant::Project { project, .. } => scope.strip_prefix("project:") == Some(project),
        _ => false,
    }
}

/// The user tokens the caller manages, oldest first, never their secrets.
pub async fn tokens(app: &Ctx, c: &Caller) -> ApiResult<Vec<ApiTokenInfo>> {
    Ok(app
        .store
        .list_tokens(TokenKind::User)
        .await?
        .into_iter()
        .filter_map(info)
        .filter(|t| manages(c, &t.scope))
        .collect())
}

/// Revokes token `id`: it is refused (401) from now on.
pub async fn revoke_token(app: &Ctx, c: &Caller, id: &str) -> ApiResult<()> {
    let found = app
        .store
        .list_tokens(TokenKind::User)
        .await?
        .into_iter()
        .filter_map(info)
        .find(|t| t.id == id && manages(c, &t.scope));
    if found.is_none() || !app.store.delete_token(TokenKind::User, id).await? {
        return Err(ApiError::NotFound {
            kind: kind("token"),
            name: id.to_string(),
            hint: Some(" (revoked or expired?); `virt8ra token list` shows the live ones"),
        });
    }
    tracing::info!(token = %id, "API token revoked");
    Ok(())
}
