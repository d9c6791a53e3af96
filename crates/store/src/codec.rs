//! How both backends encode what they store: resources as JSON text in
//! `body`, timestamps as RFC 3339 text in one fixed form (UTC,
//! microseconds), which sorts and compares as a string. One encoding, so
//! that a row means the same in SQLite and in PostgreSQL.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, StoreError};

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::db("encode", e))
}

pub(crate) fn from_json<T: DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::db("corrupt row", e))
}

pub(crate) fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub(crate) fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::db(format!("corrupt timestamp {s:?}"), e))
}
