//! The route table: every method and path of the API, who may call it
//! ([`Access`]) and its handler; the router is built from it alone.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;

pub use super::auth::Access;
use super::extract::JSON_BODY_LIMIT;
use super::system::{healthz, method_not_allowed, metrics, not_found};
use super::{
    agent, apps, audit, catalog, hosts, images, metrics as prometheus, migrations, networks,
    openapi, providers, relay, sites, tenancy, tokens, vms, watch,
};
use crate::state::Ctx;

/// One method on one path, who may call it, and its handler.
pub struct Route {
    pub method: Method,
    /// The full path, as in the OpenAPI document (`{name}` for a segment).
    pub path: &'static str,
    pub access: Access,
    pub handler: MethodRouter<Ctx>,
}

impl Route {
    fn new<H, T>(
        (method, filter): (Method, MethodFilter),
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Route
    where
        H: Handler<T, Ctx>,
        T: 'static,
    {
        Route {
            method,
            path,
            access,
            handler: axum::routing::on(filter, handler),
        }
    }
}

fn get<H: Handler<T, Ctx>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::GET, MethodFilter::GET), path, a, h)
}
fn post<H: Handler<T, Ctx>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::POST, MethodFilter::POST), path, a, h)
}
fn put<H: Handler<T, Ctx>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::PUT, MethodFilter::PUT), path, a, h)
}
fn patch<H: Handler<T, Ctx>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::PATCH, MethodFilter::PATCH), path, a, h)
}
fn delete<H: Handler<T, Ctx>, T: 'static>(path: &'static str, a: Access, h: H) -> Route {
    Route::new((Method::DELETE, MethodFilter::DELETE), path, a, h)
}

/// Every route of the control plane. [`router`] is built from this table
/// and nothing else, so a route cannot be missing from it.
pub fn routes() -> Vec<Route> {
    use Access::{
        Admin, AdminOrHost, Anyone, Host, Infra, Join, ProjectAdmin, Read, ReadOrHost, VmRead,
        Write,
    };
    vec![
        get("/healthz", Anyone, healthz),
        get("/api/v1/openapi.json", Anyone, openapi::serve),
        get("/api/v1/metrics", Admin, metrics),
        get("/metrics", Admin, prometheus::scrape),
        get("/api/v1/providers", Infra, providers::list),
        post("/api/v1/providers", Admin, providers::create),
        get("/api/v1/providers/{key}", Infra, providers::show),
        patch("/api/v1/providers/{key}", Infra, providers::update),
        delete("/api/v1/providers/{key}", Admin, providers::delete),
        get("/api/v1/sites", Infra, sites::list),
        post("/api/v1/sites", Infra, sites::create),
        get("/api/v1/sites/{key}", Infra, sites::show),
        patch("/api/v1/sites/{key}", Infra, sites::update),
        delete("/api/v1/sites/{key}", Infra, sites::delete),
        get("/api/v1/hosts", Infra, hosts::list),
        get("/api/v1/hosts/{key}", Infra, hosts::show),
        patch("/api/v1/hosts/{key}", Infra, hosts::update),
        delete("/api/v1/hosts/{key}", Infra, hosts::delete),
        post("/api/v1/join-tokens", Infra, hosts::create_join_token),
        get("/api/v1/images", Read, images::list),
        post("/api/v1/images", Write, images::upload),
        get("/api/v1/images/{key}", Read, images::show),
        delete("/api/v1/images/{key}", Write, images::delete),
        get("/api/v1/images/{key}/data", AdminOrHost, images::download),
        post("/api/v1/images/import", Write, images::import_url),
        get("/api/v1/images/transfers", Admin, images::transfers),
        post("/api/v1/images/{key}/replicate", Admin, images::replicate),
        get("/api/v1/appliances", Read, catalog::list),
        post("/api/v1/appliances", Admin, catalog::publish),
        get("/api/v1/appliances/{key}", Read, catalog::show),
        delete("/api/v1/appliances/{key}", Admin, catalog::unpublish),
        get("/api/v1/catalog", Anyone, catalog::serve),
        get("/api/v1/catalog/key", Admin, catalog::public_key),
        get(
            "/api/v1/catalog/images/{sha256}",
            Anyone,
            catalog::image_data,
        ),
        get("/api/v1/catalogs", Admin, catalog::list_catalogs),
        post("/api/v1/catalogs", Admin, catalog::add),
        delete("/api/v1/catalogs/{name}", Admin, catalog::remove),
        post("/api/v1/catalogs/{name}/refresh", Admin, catalog::refresh),
        get("/api/v1/apps", Read, apps::list),
        post("/api/v1/apps", Write, apps::create),
        get("/api/v1/apps/{key}", Read, apps::show),
        delete("/api/v1/apps/{key}", Write, apps::delete),
        get("/api/v1/networks", Read, networks::list),
        post("/api/v1/networks", Write, networks::create),
        get("/api/v1/networks/{key}", Read, networks::show),
        get("/api/v1/networks/{key}/hosts", Read, networks::hosts),
        delete("/api/v1/networks/{key}", Write, networks::delete),
        get("/api/v1/vms", VmRead, vms::list),
        post("/api/v1/vms", Write, vms::create),
        post("/api/v1/vms/plan", Write, vms::plan),
        get("/api/v1/watch", Read, watch::watch),
        get("/api/v1/vms/{key}", VmRead, vms::show),
        delete("/api/v1/vms/{key}", Write, vms::delete),
        post("/api/v1/vms/{key}/actions", Write, vms::action),
        get("/api/v1/vms/{key}/console", Read, vms::console),
        get("/api/v1/vms/{key}/events", Read, vms::events),
        post("/api/v1/vms/{key}/migrate", Write, migrations::create),
        get("/api/v1/vms/{key}/migrations", Read, migrations::history),
        post("/api/v1/vms/{key}/export", Write, migrations::export),
        get("/api/v1/migrations", Read, migrations::list),
        post("/api/v1/rebalance", Admin, migrations::rebalance),
        get("/api/v1/migrations/{id}", Read, migrations::show),
        post(
            "/api/v1/hosts/{key}/evacuate",
            Infra,
            migrations::evacuate_host,
        ),
        post(
            "/api/v1/sites/{key}/evacuate",
            Infra,
            migrations::evacuate_site,
        ),
        post(
            "/api/v1/providers/{key}/evacuate",
            Infra,
            migrations::evacuate_provider,
        ),
        get("/api/v1/exports/{id}", Read, migrations::show_export),
        delete("/api/v1/exports/{id}", Write, migrations::delete_export),
        get("/api/v1/staging/{id}", ReadOrHost, migrations::download),
        put("/api/v1/staging/{id}", Host, migrations::upload),
        get(
            "/api/v1/staging/{id}/status",
            AdminOrHost,
            migrations::staged,
        ),
        post("/api/v1/agent/join", Join, agent::join),
        get("/api/v1/agent/connect", Host, agent::connect),
        get("/api/v1/agent/mux", Host, agent::mux),
        get(
            "/api/v1/relay/{migration_id}/{stream}/{conn_id}",
            Host,
            relay::relay,
        ),
        get("/api/v1/join-tokens", Admin, tokens::list_join_tokens),
        delete("/api/v1/join-tokens/{id}", Admin, tokens::revoke_join_token),
        post(
            "/api/v1/admin-token/rotate",
            Admin,
            tokens::rotate_admin_token,
        ),
        get("/api/v1/audit", Read, audit::list),
        get("/api/v1/vms/{key}/history", Read, audit::history),
        get("/api/v1/usage", Read, audit::usage),
        get("/api/v1/whoami", VmRead, tenancy::whoami),
        get("/api/v1/orgs", Admin, tenancy::list_orgs),
        post("/api/v1/orgs", Admin, tenancy::create_org),
        get("/api/v1/orgs/{key}", Admin, tenancy::show_org),
        delete("/api/v1/orgs/{key}", Admin, tenancy::delete_org),
        get("/api/v1/projects", Read, tenancy::list_projects),
        post("/api/v1/projects", Admin, tenancy::create_project),
        get("/api/v1/projects/{key}", Read, tenancy::show_project),
        delete("/api/v1/projects/{key}", Admin, tenancy::delete_project),
        get("/api/v1/projects/{key}/quota", Read, tenancy::show_quota),
        put("/api/v1/projects/{key}/quota", Admin, tenancy::set_quota),
        get("/api/v1/users", Admin, tenancy::list_users),
        post("/api/v1/users", Admin, tenancy::create_user),
        get("/api/v1/users/{key}", Admin, tenancy::show_user),
        delete("/api/v1/users/{key}", Admin, tenancy::delete_user),
        get("/api/v1/tokens", ProjectAdmin, tenancy::list_tokens),
        post("/api/v1/tokens", ProjectAdmin, tenancy::create_token),
        delete("/api/v1/tokens/{id}", ProjectAdmin, tenancy::revoke_token),
    ]
}

pub fn router(app: Ctx) -> Router {
    let mut router = Router::new();
    for r in routes() {
        // Several methods on one path merge into one method router.
        router = router.route(r.path, r.handler);
    }
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        // Request ids, and every changing call in the audit log before
        // its answer leaves (`http::audit`).
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            audit::record,
        ))
        // Outermost, on every route and the fallbacks: counts and times
        // each request by the route template matched.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            prometheus::track,
        ))
        .with_state(app)
}
