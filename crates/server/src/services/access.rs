//! Who a caller is and what its token grants: the [`Caller`] every
//! authenticated request resolves to (`crate::http::auth::require`), and
//! the questions handlers and services ask it about a resource's project
//! or provider. Below the HTTP layer so that services can take a caller
//! too (a token is made for a project its maker sees).

use virt8ra_api::{Role, DEFAULT_PROJECT};
use virt8ra_store::{TokenKind, TokenRecord};

use crate::error::{ApiError, ApiResult, Kind};

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
    /// The grant of a stored token.
    pub fn of(rec: &TokenRecord) -> ApiResult<Grant> {
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
    pub fn describe(&self) -> String {
        match self {
            Grant::Platform => "platform".into(),
            Grant::Project { role, .. } => format!("project {}", role.as_str()),
            Grant::Operator { .. } => "provider operator".into(),
            Grant::Host(_) => "host".into(),
            Grant::Join => "join".into(),
        }
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
