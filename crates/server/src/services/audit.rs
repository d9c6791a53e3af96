//! The audit log's rules: reading it (filters checked, pages by sequence
//! number) and its retention. Records are written by the HTTP layer's
//! audit middleware (`http::audit`), the one place that sees every call.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures_util::stream::{self, Stream};
use virt8ra_api::{AuditRecord, Page};
use virt8ra_store::AuditFilter;

use crate::error::{ApiError, ApiResult};
use crate::state::Ctx;

/// The largest page of `GET /audit`.
pub const MAX_PAGE: usize = 1000;

/// `since` and `until` as given: RFC 3339, or a date (its midnight, UTC).
pub fn parse_time(what: &str, s: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "{what} {s:?} is neither an RFC 3339 time (2026-03-01T12:00:00Z) nor a date (2026-03-01)"
            ))
        })
}

/// The query's parts, checked.
#[derive(Debug, Default)]
pub struct Query<'a> {
    pub since: Option<&'a str>,
    pub until: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub resource: Option<&'a str>,
    pub user: Option<&'a str>,
    pub project: Option<&'a str>,
    pub limit: Option<usize>,
    pub cursor: Option<&'a str>,
}

/// The store's filter for a query; a 400 that names the bad parameter.
pub fn filter(q: &Query<'_>, default_limit: usize) -> ApiResult<AuditFilter> {
    let limit = q.limit.unwrap_or(default_limit);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::Invalid(format!(
            "limit {limit} is outside 1..{MAX_PAGE}"
        )));
    }
    let after_seq = q
        .cursor
        .map(|c| {
            c.parse::<u64>().map_err(|_| {
                ApiError::Invalid(format!(
                    "cursor {c:?} is not one this list gave (a next_cursor)"
                ))
            })
        })
        .transpose()?;
    let since = q.since.map(|s| parse_time("since", s)).transpose()?;
    let until = q.until.map(|s| parse_time("until", s)).transpose()?;
    if let (Some(a), Some(b)) = (since, until) {
        if b <= a {
            return Err(ApiError::Invalid(format!(
                "until ({b}) is not after since ({a})"
            )));
        }
    }
    let resource = q.resource.map(|r| {
        r.trim_start_matches("/api/v1/")
            .trim_matches('/')
            .to_string()
    });
    Ok(AuditFilter {
        since,
        until,
        actor: q.actor.map(str::to_string),
        resource: resource.filter(|r| !r.is_empty()),
        user: q.user.map(str::to_string),
        project: q.project.map(str::to_string),
        after_seq,
        limit,
    })
}

/// One page, oldest first (100 records unless the query says).
pub async fn page(app: &Ctx, q: &Query<'_>) -> ApiResult<Page<AuditRecord>> {
    let f = filter(q, 100)?;
    let items = app.store.list_audit(&f).await?;
    let next_cursor = (items.len() == f.limit)
        .then(|| items.last().map(|r| r.seq.to_string()))
        .flatten();
    Ok(Page { items, next_cursor })
}

/// Every record that matches (at most `limit`, when the query gives one)
/// as JSON lines, read a page at a time as the stream is consumed.
pub fn export(
    app: &Ctx,
    q: &Query<'_>,
) -> ApiResult<impl Stream<Item = Result<String, std::io::Error>> + Send + 'static> {
    let f = filter(q, MAX_PAGE)?;
    let left = q.limit.unwrap_or(usize::MAX);
    let app = app.clone();
    Ok(stream::unfold((Some(f), left), move |(f, left)| {
        let app = app.clone();
        async move {
            let mut f = f.filter(|_| left > 0)?;
            f.limit = f.limit.min(left);
            let items = match app.store.list_audit(&f).await {
                Ok(items) => items,
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), (None, 0))),
            };
            let mut out = String::new();
            for r in &items {
                if let Ok(line) = serde_json::to_string(r) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            let full = !items.is_empty() && items.len() == f.limit;
            f.after_seq = items.last().map(|r| r.seq).or(f.after_seq);
            Some((Ok(out), (full.then_some(f), left - items.len())))
        }
    }))
}

/// Appends a record durably.
pub async fn append(app: &Ctx, r: &AuditRecord) -> ApiResult<u64> {
    Ok(app.store.append_audit(r).await?)
}

/// Deletes records older than `days`, now and every hour (the operator's
/// `--audit-retention-days`; without it records are kept for ever).
pub fn keep_for(app: &Ctx, days: u32) {
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            let before = Utc::now() - chrono::Duration::days(days.into());
            match app.store.prune_audit(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, days, "audit records past retention deleted"),
                Err(e) => tracing::warn!(error = %e.chain(), "audit retention"),
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_queries_say_which_parameter() {
        let e = |q: Query<'_>| filter(&q, 100).unwrap_err().to_string();
        assert!(e(Query {
            since: Some("yesterday"),
            ..Default::default()
        })
        .starts_with("since"));
        assert!(e(Query {
            limit: Some(0),
            ..Default::default()
        })
        .starts_with("limit 0"));
        assert!(e(Query {
            cursor: Some("x"),
            ..Default::default()
        })
        .starts_with("cursor"));
        assert!(e(Query {
            since: Some("2026-03-02"),
            until: Some("2026-03-01"),
            ..Default::default()
        })
        .starts_with("until"));
        let f = filter(
            &Query {
                since: Some("2026-03-01"),
                resource: Some("/api/v1/vms/web/"),
                ..Default::default()
            },
            100,
        )
        .unwrap();
        assert_eq!(f.resource.as_deref(), Some("vms/web"));
        assert_eq!(f.since.unwrap().to_rfc3339(), "2026-03-01T00:00:00+00:00");
    }
}
