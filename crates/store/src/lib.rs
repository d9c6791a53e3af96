//! The control plane's durable state.
//!
//! [`Store`] is the seam between the control plane and its database. The
//! embedded SQLite backend ([`SqliteStore`]) is the zero-set-up default;
//! the PostgreSQL backend ([`PgStore`]) implements the same trait with the
//! same rules, for operators who run their database as a service (and,
//! later, several control planes on it). Every method that changes state
//! returns only after the change is committed durably (SQLite in WAL mode
//! with `synchronous=FULL`; PostgreSQL's commit), so an acknowledged API
//! write survives a SIGKILL of the control plane at any moment.
//!
//! Rows keep a few indexed columns (id, name, foreign keys, phase) for lookups
//! and constraints, and the whole resource as JSON in `body`, so adding a field
//! to a resource needs no schema upgrade; schema changes that do need one are
//! numbered upgrades in [`schema`].
//!
//! This file only declares the modules and re-exports what callers use:
//! the trait in `store.rs`, its error in `error.rs`, its records in
//! `records.rs`, the backends in `sqlite/`, `postgres/` and `cached.rs`,
//! the encoding both backends share in `codec.rs`. Modules import
//! from those files, never from here, so no import runs in a circle.

mod audit_query;
mod cached;
mod codec;
#[cfg(test)]
mod conformance;
mod error;
#[cfg(any(test, feature = "test-util"))]
pub mod pgtest;
mod postgres;
mod records;
mod residency;
pub mod schema;
mod sqlite;
mod store;

pub use cached::CachedStore;
pub use error::{ErrorSource, Result, StoreError};
pub use postgres::{parse_url as parse_postgres_url, redact_url, PgStore};
pub use records::{AuditFilter, TokenGrant, TokenKind, TokenRecord, VmFilter};
pub use sqlite::{CommitHook, SqliteStore};
pub use store::Store;
