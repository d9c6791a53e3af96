//! Records the [`Store`](crate::store::Store) trait takes that are not API
//! resources: tokens (kept as hashes) and the filter for listing VMs.

use chrono::{DateTime, Utc};
use virt8ra_api::VmPhase;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Full access to the API.
    Admin,
    /// May register one (or `uses_left`) host at `site`.
    Join,
    /// The credential of one host's agent.
    Host,
    /// A person's API token: what it may do is its [`TokenGrant`].
    User,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Join => "join",
            TokenKind::Host => "host",
            TokenKind::User => "user",
        }
    }
    pub fn parse(s: &str) -> Option<TokenKind> {
        Some(match s {
            "admin" => TokenKind::Admin,
            "join" => TokenKind::Join,
            "host" => TokenKind::Host,
            "user" => TokenKind::User,
            _ => return None,
        })
    }
}

/// A stored token: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub kind: TokenKind,
    pub hash: String,
    /// Site name (join tokens).
    pub site: Option<String>,
    /// Host id (host tokens).
    pub host_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub uses_left: Option<u32>,
    pub created_at: DateTime<Utc>,
    /// Whose token it is and what it may do (user tokens).
    pub grant: Option<TokenGrant>,
}

/// A user token's owner, scope and role. The scope is `platform`,
/// `project:NAME` or `provider:NAME`; the role `admin`, `member`, `viewer`
/// (project scopes) or `operator` (provider scopes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The owner's user name.
    pub user: String,
    pub scope: String,
    pub role: String,
    /// The name its owner gave it (unique per user is not enforced).
    pub name: String,
}

/// A grant from its four stored columns (user, scope, role, name): all
/// four or none.
pub(crate) fn grant_of(cols: [Option<String>; 4]) -> Option<TokenGrant> {
    let [user, scope, role, name] = cols;
    Some(TokenGrant {
        user: user?,
        scope: scope?,
        role: role?,
        name: name?,
    })
}

/// Filters for listing VMs. `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    pub host_id: Option<String>,
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    pub phase: Option<VmPhase>,
    /// The project (name) owning the VM; a VM without one is `default`'s.
    pub project: Option<String>,
    /// Include VMs in phase `deleted` (default: no).
    pub include_deleted: bool,
    /// Return VMs whose id sorts after this one (cursor pagination).
    pub after_id: Option<String>,
    pub limit: Option<usize>,
}

/// Filters for reading the audit log, oldest first. `None` matches
/// everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records before this time.
    pub until: Option<DateTime<Utc>>,
    /// A token id, or a token kind (`admin`, `host`, `join`).
    pub actor: Option<String>,
    /// This resource (`vms/web`) and everything under it (`vms/web/migrate`).
    pub resource: Option<String>,
    /// Calls made with a token of this user.
    pub user: Option<String>,
    /// Calls made with a token scoped to this project.
    pub project: Option<String>,
    /// Records after this sequence number (cursor pagination).
    pub after_seq: Option<u64>,
    pub limit: usize,
}
