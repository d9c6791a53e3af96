//! The WHERE clause of an audit query, once for both backends: they
//! differ only in how a parameter is written, how a field of the record's
//! JSON body is read, and how a text parameter becomes a sequence number.

use crate::codec::ts;
use crate::records::AuditFilter;

/// What one backend's SQL spells its own way.
pub(crate) struct Dialect {
    /// The `n`th parameter (from 1): `?1` or `$1`.
    pub param: fn(usize) -> String,
    /// The record body's `actor.KEY`, as text.
    pub actor_field: fn(&str) -> String,
    /// A parameter compared with `seq` (every parameter is text).
    pub as_seq: fn(String) -> String,
}

/// The clause (starting with ` WHERE`) and its parameters, in order.
pub(crate) fn audit_where(f: &AuditFilter, d: &Dialect) -> (String, Vec<String>) {
    let mut sql = String::from(" WHERE 1=1");
    let mut args: Vec<String> = Vec::new();
    let mut arg = |v: String| {
        args.push(v);
        (d.param)(args.len())
    };
    if let Some(t) = f.since {
        sql += &format!(" AND at >= {}", arg(ts(&t)));
    }
    if let Some(t) = f.until {
        sql += &format!(" AND at < {}", arg(ts(&t)));
    }
    if let Some(a) = &f.actor {
        let p = arg(a.clone());
        sql += &format!(" AND (actor = {p} OR kind = {p})");
    }
    // The user and the project are inside the record's body (no column
    // of their own: these queries are rare, and come with a time range).
    for (k, v) in [("user", &f.user), ("project", &f.project)] {
        if let Some(v) = v {
            let p = arg(v.clone());
            sql += &format!(" AND {} = {p}", (d.actor_field)(k));
        }
    }
    if let Some(r) = &f.resource {
        // The resource and what is under it: "vms/web/..." sorts between
        // "vms/web/" and "vms/web0" ('0' follows '/').
        let (p, lo, hi) = (arg(r.clone()), arg(format!("{r}/")), arg(format!("{r}0")));
        sql += &format!(" AND (resource = {p} OR (resource >= {lo} AND resource < {hi}))");
    }
    if let Some(s) = f.after_seq {
        let p = arg(s.to_string());
        sql += &format!(" AND seq > {}", (d.as_seq)(p));
    }
    (sql, args)
}
