//! Wire types of virt8ra.
//!
//! Everything that crosses a process boundary lives here: the resources of the
//! HTTP API (`/api/v1/...`) and the messages of the agent protocol. The crate
//! depends on serde, chrono and utoipa only, so the CLI, the agent, the server
//! and outside tools can share it without pulling in a runtime.
//!
//! Request bodies reject unknown fields (`deny_unknown_fields`): a typo in a
//! field name is an error, never a silently ignored setting.

pub mod audit;
pub mod guest;
pub mod market;
pub mod migration;
pub mod mux;
pub mod network;
pub mod overlay;
pub mod protocol;
pub mod resources;
pub mod tenancy;
pub mod validate;

pub use audit::*;
pub use guest::*;
pub use market::*;
pub use migration::*;
pub use network::*;
pub use overlay::*;
pub use resources::*;
pub use tenancy::*;

/// The body of every error answer of the API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `not_found`, `invalid_request`, `conflict`.
    pub code: String,
    /// What was wrong, for a person.
    pub message: String,
}
