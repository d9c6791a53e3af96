//! The HTTP layer: the API under `/api/v1`.
//!
//! Routing ([`mod@routes`]), extractors ([`extract`]), authentication
//! ([`auth`]), the OpenAPI document ([`openapi`]), the one mapping of the
//! domain error to a status code and JSON body ([`error`]), and the
//! handlers, one module per resource. A handler parses the request, calls
//! a service or a workflow and serializes the answer; the rules live in
//! [`crate::services`] and [`crate::workflows`].
//!
//! Handlers validate, record intent in the store, wake the scheduler and
//! answer. They never wait for an agent to act (the console read is the one
//! exception: it is a read of the agent's disk) and never retry.

pub mod agent;
pub mod apps;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod error;
pub mod extract;
pub mod hosts;
pub mod images;
pub mod metrics;
pub mod migrations;
pub mod networks;
pub mod openapi;
pub mod providers;
pub mod relay;
pub mod routes;
pub mod sites;
pub mod system;
pub mod tenancy;
pub mod tokens;
pub mod vms;
pub mod watch;

pub use routes::{router, routes, Access, Route};
