//! `GET /api/v1/watch`: a stream of changes (server-sent events), so clients
//! and the dashboard do not poll. Each durable VM change is one event `vm`
//! carrying the VM's whole new state; a watcher that falls behind gets one
//! `resync` event (list again, then keep watching). Filters narrow the stream.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use virt8ra_api::WatchEvent;

use super::extract::Query;
use crate::http::auth::Reader;
use crate::state::Ctx;

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// Only VMs at this site.
    pub site: Option<String>,
    pub provider: Option<String>,
    pub country: Option<String>,
    /// Only the VM with this name.
    pub name: Option<String>,
}

/// Whether a watcher of `project` (none: every project's) and `q` wants `ev`.
fn wanted(ev: &WatchEvent, q: &WatchQuery, project: Option<&str>) -> bool {
    match ev {
        WatchEvent::Resync { .. } => true,
        WatchEvent::Vm { vm } => {
            let s = &vm.status;
            project.is_none_or(|p| vm.project == p)
                && q.site.as_ref().is_none_or(|x| s.site.as_ref() == Some(x))
                && q.provider
                    .as_ref()
                    .is_none_or(|x| s.provider.as_ref() == Some(x))
                && q.country
                    .as_ref()
                    .is_none_or(|x| s.country.as_ref() == Some(x))
                && q.name.as_ref().is_none_or(|x| *x == vm.name)
        }
    }
}

fn event(ev: &WatchEvent) -> Event {
    let kind = match ev {
        WatchEvent::Vm { .. } => "vm",
        WatchEvent::Resync { .. } => "resync",
    };
    Event::default()
        .event(kind)
        .data(serde_json::to_string(ev).unwrap_or_default())
}

#[utoipa::path(get, path = "/api/v1/watch", tag = "vms", params(WatchQuery),
    responses((status = 200, description = "Server-sent events; each `data` is a WatchEvent",
               body = virt8ra_api::WatchEvent, content_type = "text/event-stream")),
    security(("bearer" = [])))]
pub async fn watch(
    Reader(c): Reader,
    State(app): State<Ctx>,
    Query(q): Query<WatchQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = app.changes.subscribe();
    // A project token watches its project's VMs; a platform admin every
    // project's, or the one it picked.
    let project = c.list_project().map(str::to_string);
    let stream = futures_util::stream::unfold((rx, q), move |(mut rx, q)| {
        let project = project.clone();
        async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(missed)) => WatchEvent::Resync { missed },
                    Err(RecvError::Closed) => return None,
                };
                if wanted(&ev, &q, project.as_deref()) {
                    return Some((Ok(event(&ev)), (rx, q)));
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
