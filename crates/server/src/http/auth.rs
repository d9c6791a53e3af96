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

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use virt8ra_api::{AuditActor, Role, PROJECT_HEADER};
use virt8ra_store::{TokenKind, TokenRecord};

use crate::error::{ApiError, ApiResult, Kind};
pub use crate::services::access::{Caller, Grant};
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

/// Who may call a route: the credential its handler's auth extractor
/// (below) accepts. The route table (`crate::http::routes`) says it for
/// every route so that tests can call each one with every kind of
/// credential and check the answer, and so that the OpenAPI document's
/// security can be checked; [`permits`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credential: health, the OpenAPI document, and the signed catalog
    /// with its images (public by design: other control planes fetch them).
    Anyone,
    /// A join token (`auth::JoinAuth`).
    Join,
    /// A host token (`auth::HostAuth`).
    Host,
    /// The admin token (`auth::Admin`).
    Admin,
    /// The admin token or a host token (`auth::AdminOrHost`).
    AdminOrHost,
    /// Reads a project's resources (`auth::Reader`): any role of a project
    /// (its own project's only) and platform admins.
    Read,
    /// Reads VMs (`auth::VmReader`): as [`Access::Read`], and provider
    /// operators (the VMs on their hosts, as metadata).
    VmRead,
    /// Changes a project's resources (`auth::Writer`): project members and
    /// admins, platform admins; never viewers.
    Write,
    /// Manages a project's tokens (`auth::ProjectAdmin`): project admins
    /// and platform admins.
    ProjectAdmin,
    /// Manages sites and hosts (`auth::Infra`): provider operators (their
    /// provider's only) and platform admins.
    Infra,
    /// [`Access::Read`] or a host token (`auth::ReaderOrHost`): staged
    /// disks, which hosts fetch and projects download (their exports).
    ReadOrHost,
}

impl Access {
    /// Whether a caller must present a bearer token.
    pub fn needs_token(self) -> bool {
        self != Access::Anyone
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
    if let Some(slot) = parts.extensions.get::<ActorSlot>() {
        slot.set(&record); // the audit log's actor, refused calls too
    }
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
            // A user token's owner, and the project it is scoped to.
            user: t.grant.as_ref().map(|g| g.user.clone()),
            project: t
                .grant
                .as_ref()
                .and_then(|g| g.scope.strip_prefix("project:"))
                .map(str::to_string),
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
