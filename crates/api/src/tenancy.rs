//! Tenants: organisations hold projects, users hold API tokens scoped to a
//! project (with a role), to a provider (its operators) or to the whole
//! platform. Every resource a tenant owns names its project; the control
//! plane decides from a token's scope and role what its holder may see and
//! change (docs/ARCHITECTURE.md, "Tenants and authorization").

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The project of resources created without one (by the admin token, or
/// before tenants existed), so nothing older is left without an owner.
pub const DEFAULT_PROJECT: &str = "default";
/// The organisation of the `default` project.
pub const DEFAULT_ORG: &str = "default";
/// The header that picks the project of a platform admin's call (a project
/// token's project is its own). The CLI sends `--project`/`VIRT8RA_PROJECT` in it.
pub const PROJECT_HEADER: &str = "x-virt8ra-project";

pub fn default_project() -> String {
    DEFAULT_PROJECT.to_string()
}

/// What a token's holder may do in its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads the project's resources; changes nothing.
    Viewer,
    /// Reads and changes the project's resources.
    Member,
    /// A member who also manages the project's tokens.
    Admin,
    /// Manages one provider's sites and hosts (provider scopes only).
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "member" => Role::Member,
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgCreate {
    /// 1-63 lowercase letters, digits and `-`.
    pub name: String,
}

/// A user's role in a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub id: String,
    pub name: String,
    /// The organisation's name.
    pub org: String,
    /// Its users and their roles (a token for a user in a project makes
    /// the user a member with at least the token's role).
    #[serde(default)]
    pub members: Vec<Member>,
    /// Its limits (`virt8ra quota set`); none: unlimited.
    #[serde(default, skip_serializing_if = "Quota::is_empty")]
    pub quota: Quota,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreate {
    /// 1-63 lowercase letters, digits and `-`.
    pub name: String,
    /// The organisation (name or id; default `default`).
    #[serde(default)]
    pub org: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub name: String,
    /// The providers whose sites and hosts the user operates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operator_of: Vec<String>,
    /// Whether the user may hold platform tokens (everything).
    #[serde(default)]
    pub platform_admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    /// 1-63 lowercase letters, digits and `-`.
    pub name: String,
    /// A platform admin (only a platform admin may make one).
    #[serde(default)]
    pub platform_admin: bool,
}

/// A new API token for a user: scoped to a project (with a role), to a
/// provider (`operator`) or, with neither, to the platform (`admin`, for
/// platform admins only).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenCreate {
    /// The owner (user name or id).
    pub user: String,
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    /// Default: `member` in a project, `operator` for a provider.
    #[serde(default)]
    pub role: Option<Role>,
    /// Lifetime in seconds (none: until revoked).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
}

/// A new API token: its secret is shown here once; only its hash is stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub id: String,
    pub user: String,
    /// `platform`, `project:NAME` or `provider:NAME`.
    pub scope: String,
    pub role: Role,
    pub name: String,
    pub token: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// An API token as listed: never its secret, nor the secret's hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenInfo {
    pub id: String,
    pub user: String,
    pub scope: String,
    pub role: Role,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Who the caller is (`GET /api/v1/whoami`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    /// The user, for user tokens (none for the admin token).
    pub user: Option<String>,
    pub scope: String,
    pub role: Role,
}

/// Limits of a project's use (none: unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Boot and data disks, GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
}

/// A project's quota: limits over all its VMs that are not deleted, and
/// per country (ISO code) over those placed there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default)]
    pub total: QuotaLimits,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub countries: std::collections::BTreeMap<String, QuotaLimits>,
}

impl Quota {
    pub fn is_empty(&self) -> bool {
        self.total == QuotaLimits::default() && self.countries.is_empty()
    }
}

/// What a project's VMs use (VMs not deleted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub vms: u64,
}

impl Usage {
    pub fn add(&mut self, o: &Usage) {
        self.vcpus += o.vcpus;
        self.memory_mib += o.memory_mib;
        self.disk_gib += o.disk_gib;
        self.vms += o.vms;
    }

    /// The first limit of `l` that `self` plus `more` would exceed, in
    /// words (`vcpus: 20 of 20 in use, 1 more asked`).
    pub fn exceeds(&self, more: &Usage, l: &QuotaLimits) -> Option<String> {
        for (what, used, add, limit) in [
            ("vcpus", self.vcpus, more.vcpus, l.vcpus),
            ("memory_mib", self.memory_mib, more.memory_mib, l.memory_mib),
            ("disk_gib", self.disk_gib, more.disk_gib, l.disk_gib),
            ("vms", self.vms, more.vms, l.vms),
        ] {
            if let Some(limit) = limit {
                if used.saturating_add(add) > limit {
                    return Some(format!(
                        "{what}: {used} of {limit} in use, {add} more asked"
                    ));
                }
            }
        }
        None
    }
}

/// A project's quota with its use against each limit
/// (`GET /api/v1/projects/{key}/quota`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaReport {
    pub project: String,
    pub quota: Quota,
    pub usage: Usage,
    /// Use per country where the project's VMs are placed.
    #[serde(default)]
    pub usage_by_country: std::collections::BTreeMap<String, Usage>,
}
