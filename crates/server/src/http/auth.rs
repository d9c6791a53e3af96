//! Bearer tokens as extractors: each reads `Authorization: Bearer TOKEN`
//! and admits the callers its endpoints take (the tokens themselves, and
//! how they are checked, are [`crate::services::tokens`]'s).
//!
//! Every authenticated request passes through [`require`], which returns
//! the [`Caller`]: who it is (token, user) and what its token grants
//! ([`Grant`]). Whether a grant may call a route at all is decided in one
//! place, [`permits`], from the route's [`Access`] in the route table; which
//! resources it may then see or change is decided by the handlers through
//! the caller's methods ([`Caller::sees`], [`Caller::owner`]): another
//! project's resource is answered 404, as if it did not exist.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use virt8ra_api::{Role, DEFAULT_PROJECT, PROJECT_HEADER};
use virt8ra_store::{TokenKind, TokenRecord};

use crate::error::{ApiError, ApiResult, Kind};
use crate::http::routes::Access;
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

/// What a token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Everything: the admin token, and platform admins' tokens.
    Platform,
    /// One project's resources, with a role in it.
    Project { project: String, role: Role },
    /// One provider's sites and hosts, and the VMs on its hosts as metadata.
    Operator { provider: String },
    /// An agent's credential (host id).
    Host(String),
    /// A join token (registers hosts; see [`JoinAuth`]).
    Join,
}

/// The authenticated caller of a request: the "who" of the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    /// The user who owns the token (none for the admin, join and host tokens).
    pub user: Option<String>,
    pub grant: Grant,
    /// The project the call is about: a project token's own; for a platform
    /// admin, the one the `X-Virt8ra-Project` header picked, if any.
    pub project: Option<String>,
    /// The stored token (join tokens' remaining uses, host tokens' host).
    pub record: TokenRecord,
}

impl Grant {
    fn of(rec: &TokenRecord) -> ApiResult<Grant> {
        Ok(match rec.kind {
            TokenKind::Admin => Grant::Platform,
            TokenKind::Join => Grant::Join,
            TokenKind::Host => Grant::Host(
                rec.host_id
                    .clone()
                    .ok_or_else(|| ApiError::Internal("host token without host".into()))?,
            ),
            TokenKind::User => {
                let g = rec
                    .grant
                    .as_ref()
                    .ok_or_else(|| ApiError::Internal("user token without a grant".into()))?;
                let role = Role::parse(&g.role)
                    .ok_or_else(|| ApiError::Internal(format!("token role {:?}", g.role)))?;
                match g.scope.split_once(':') {
                    Some(("project", p)) => Grant::Project {
                        project: p.to_string(),
                        role,
                    },
                    Some(("provider", p)) => Grant::Operator {
                        provider: p.to_string(),
                    },
                    _ if g.scope == "platform" => Grant::Platform,
                    _ => return Err(ApiError::Internal(format!("token scope {:?}", g.scope))),
                }
            }
        })
    }

    /// The holder, in the words of a refusal ("a project viewer token").
    fn describe(&self) -> String {
        match self {
            Grant::Platform => "platform".into(),
            Grant::Project { role, .. } => format!("project {}", role.as_str()),
            Grant::Operator { .. } => "provider operator".into(),
            Grant::Host(_) => "host".into(),
            Grant::Join => "join".into(),
        }
    }
}

/// Whether `grant` may call a route of `access` at all (what it may see
/// there is the handler's to decide, by [`Caller::sees`]).
pub fn permits(access: Access, grant: &Grant) -> bool {
    use Access::*;
    let reader = |g: &Grant| matches!(g, Grant::Platform | Grant::Project { .. });
    match access {
        Anyone => true,
        Join => *grant == Grant::Join,
        Host => matches!(grant, Grant::Host(_)),
        Admin => *grant == Grant::Platform,
        AdminOrHost => matches!(grant, Grant::Platform | Grant::Host(_)),
        Read => reader(grant),
        VmRead => reader(grant) || matches!(grant, Grant::Operator { .. }),
        Write => match grant {
            Grant::Platform => true,
            Grant::Project { role, .. } => *role >= Role::Member,
            _ => false,
        },
        ProjectAdmin => match grant {
            Grant::Platform => true,
            Grant::Project { role, .. } => *role == Role::Admin,
            _ => false,
        },
        Infra => matches!(grant, Grant::Platform | Grant::Operator { .. }),
        ReadOrHost => reader(grant) || matches!(grant, Grant::Host(_)),
    }
}

/// Authenticates the request's token and checks that its grant may call a
/// route of `access`. Every authenticated request passes through here.
pub async fn require(parts: &Parts, app: &Ctx, access: Access) -> Result<Caller, ApiError> {
    let token = bearer(parts)?;
    let record = tokens::authenticate(app, token).await?;
    let grant = Grant::of(&record)?;
    if !permits(access, &grant) {
        return Err(ApiError::Forbidden(format!(
            "a {} token cannot do this",
            grant.describe()
        )));
    }
    let project = picked_project(parts, app, &grant).await?;
    Ok(Caller {
        token_id: record.id.clone(),
        user: record.grant.as_ref().map(|g| g.user.clone()),
        grant,
        project,
        record,
    })
}

/// The project a call is about: a project token's own (a header naming
/// another is answered as if that project did not exist); for a platform
/// admin, the header's, which must exist.
async fn picked_project(parts: &Parts, app: &Ctx, grant: &Grant) -> ApiResult<Option<String>> {
    let header = match parts.headers.get(PROJECT_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::Invalid(format!("malformed {PROJECT_HEADER} header")))?
                .trim()
                .to_string(),
        ),
    };
    match (grant, header) {
        (Grant::Project { project, .. }, h) => {
            if let Some(h) = h.filter(|h| !h.is_empty() && h != project) {
                return Err(ApiError::not_found(Kind::Other("project"), h));
            }
            Ok(Some(project.clone()))
        }
        (Grant::Platform, Some(h)) if !h.is_empty() => {
            let p = crate::services::tenancy::project(app, &h).await?;
            Ok(Some(p.name))
        }
        _ => Ok(None),
    }
}

impl Caller {
    pub fn is_platform(&self) -> bool {
        self.grant == Grant::Platform
    }

    /// Whether the caller may see (and, where its role lets it, change) a
    /// resource owned by `project`.
    pub fn sees(&self, project: &str) -> bool {
        match &self.grant {
            Grant::Platform => true,
            Grant::Project { project: p, .. } => p == project,
            _ => false,
        }
    }

    /// `Ok` if the caller sees `project`'s resource `key` of `kind`, else
    /// the 404 it would get if the resource did not exist.
    pub fn check(&self, project: &str, kind: Kind, key: &str) -> ApiResult<()> {
        if self.sees(project) {
            Ok(())
        } else {
            Err(ApiError::not_found(kind, key))
        }
    }

    /// The project whose resources a list shows (none: every project's,
    /// for a platform admin who picked none).
    pub fn list_project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// The project that owns what the caller creates.
    pub fn owner(&self) -> String {
        self.project
            .clone()
            .unwrap_or_else(|| DEFAULT_PROJECT.to_string())
    }

    /// The provider an operator token is scoped to.
    pub fn operator_of(&self) -> Option<&str> {
        match &self.grant {
            Grant::Operator { provider } => Some(provider),
            _ => None,
        }
    }

    /// `Ok` if the caller may manage provider `provider`'s sites and hosts
    /// (platform admins: every provider's), else the 404 for `key`.
    pub fn check_provider(&self, provider: &str, kind: Kind, key: &str) -> ApiResult<()> {
        match self.operator_of() {
            Some(p) if p != provider => Err(ApiError::not_found(kind, key)),
            _ => Ok(()),
        }
    }
}

/// Declares an extractor that admits the callers of one [`Access`].
macro_rules! extractor {
    ($(#[$doc:meta])* $name:ident, $access:expr) => {
        $(#[$doc])*
        pub struct $name(pub Caller);

        impl FromRequestParts<Ctx> for $name {
            type Rejection = ApiError;
            async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
                require(parts, app, $access).await.map($name)
            }
        }
    };
}

extractor!(
    /// A platform admin (the admin token, or a platform admin's token).
    Admin,
    Access::Admin
);
extractor!(
    /// A reader of a project's resources (platform admins: every project's).
    Reader,
    Access::Read
);
extractor!(
    /// A reader of VMs: also provider operators, who see the VMs on their
    /// provider's hosts as metadata.
    VmReader,
    Access::VmRead
);
extractor!(
    /// A caller that may change a project's resources (members and admins
    /// of the project; platform admins).
    Writer,
    Access::Write
);
extractor!(
    /// A project admin (its tokens) or a platform admin.
    ProjectAdmin,
    Access::ProjectAdmin
);
extractor!(
    /// A reader of a project's resources, or a host (staged disks).
    ReaderOrHost,
    Access::ReadOrHost
);
extractor!(
    /// A manager of sites and hosts: a provider operator (its provider's
    /// only) or a platform admin.
    Infra,
    Access::Infra
);

/// An agent, by its host credential.
pub struct HostAuth {
    pub host_id: String,
}

impl FromRequestParts<Ctx> for HostAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        let c = require(parts, app, Access::Host).await?;
        match c.grant {
            Grant::Host(host_id) => Ok(HostAuth { host_id }),
            _ => Err(ApiError::Internal(
                "host route admitted another token".into(),
            )),
        }
    }
}

/// A joining agent, by its join token.
pub struct JoinAuth(pub TokenRecord);

impl FromRequestParts<Ctx> for JoinAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        let rec = require(parts, app, Access::Join).await?.record;
        if rec.uses_left == Some(0) {
            return Err(ApiError::Unauthorized("join token is used up".into()));
        }
        Ok(JoinAuth(rec))
    }
}

/// Either a platform admin or a host (image downloads).
pub struct AdminOrHost(pub Option<String>);

impl FromRequestParts<Ctx> for AdminOrHost {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Ctx) -> Result<Self, Self::Rejection> {
        let c = require(parts, app, Access::AdminOrHost).await?;
        Ok(AdminOrHost(match c.grant {
            Grant::Host(h) => Some(h),
            _ => None,
        }))
    }
}
