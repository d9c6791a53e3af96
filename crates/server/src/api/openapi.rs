//! The OpenAPI 3 document, generated from the handlers' annotations and the
//! wire types. A copy is committed at `openapi/virt8ra.json`; a test fails
//! when it is stale (`UPDATE_OPENAPI=1 cargo test -p virt8ra-server openapi` refreshes it;
//! `virt8ra openapi` prints it).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    agent, apps, catalog, hosts, images, migrations, providers, relay, sites, tokens, vms, watch,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "virt8ra",
        description = "Sovereign multi-provider cloud-edge control plane. Every call needs `Authorization: Bearer TOKEN` except /healthz, this document, and, public by design, this control plane's signed catalog (/api/v1/catalog) and its published images (/api/v1/catalog/images/{sha256}), which other control planes fetch and verify with the catalog's public key (given out of band: /api/v1/catalog/key needs the admin token).",
        license(name = "Apache-2.0")
    ),
    paths(
        super::healthz, serve, super::metrics,
        providers::list, providers::create, providers::show, providers::update, providers::delete,
        sites::list, sites::create, sites::show, sites::update, sites::delete,
        hosts::list, hosts::show, hosts::update, hosts::delete, hosts::create_join_token,
        images::list, images::upload, images::show, images::delete, images::download,
        images::import_url, images::transfers, images::replicate,
        catalog::publish, catalog::list, catalog::show, catalog::unpublish, catalog::serve,
        catalog::public_key, catalog::image_data, catalog::add, catalog::refresh,
        catalog::list_catalogs, catalog::remove,
        apps::create, apps::list, apps::show, apps::delete,
        vms::list, vms::create, vms::plan, vms::show, vms::delete, vms::action, vms::console, vms::events, watch::watch,
        migrations::create, migrations::list, migrations::show, migrations::history,
        migrations::evacuate_host, migrations::evacuate_site, migrations::evacuate_provider, migrations::rebalance,
        migrations::export, migrations::show_export, migrations::delete_export,
        migrations::download, migrations::upload, migrations::staged,
        agent::join, agent::connect, agent::mux, relay::relay,
        tokens::list_join_tokens, tokens::revoke_join_token, tokens::rotate_admin_token,
    ),
    modifiers(&Bearer),
    tags(
        (name = "providers", description = "Operators that own sites"),
        (name = "sites", description = "Core and edge locations"),
        (name = "hosts", description = "Bare-metal hosts, registered by their agents"),
        (name = "images", description = "Content-addressed disk images"),
        (name = "vms", description = "Virtual machines"),
        (name = "migrations", description = "Moving VMs between hosts, sites, providers and countries; evacuation; export"),
        (name = "marketplace", description = "Appliances and signed catalogs"),
        (name = "apps", description = "One appliance deployed at several locations"),
        (name = "agent", description = "Host agents' endpoints"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as pretty JSON, as committed in the repository.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system",
    responses((status = 200, description = "This document")))]
pub async fn serve() -> Json<serde_json::Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/virt8ra.json");
        let current = super::document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, format!("{}\n", current.trim())).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed.trim() == current.trim(),
            "openapi/virt8ra.json is stale: run `UPDATE_OPENAPI=1 cargo test -p virt8ra-server openapi`"
        );
    }
}
