//! The OpenAPI 3 document, generated from the handlers' annotations and the
//! wire types. A copy is committed at `openapi/virt8ra.json`; a test fails
//! when it is stale (`UPDATE_OPENAPI=1 cargo test -p virt8ra-server openapi` refreshes it;
//! `virt8ra openapi` prints it).
//!
//! The handlers' annotations say what each operation takes and answers and
//! whether it needs a token; [`Bearer`] then adds what is the same for every
//! operation (the 401 and 403 answers of those that need a token, operation
//! ids unique across the document), so that no annotation can forget them.
//! A test checks the document against the route table ([`super::routes()`]):
//! the same operations, every path parameter a segment of its path, and
//! security exactly where the router asks for a token.

use axum::Json;
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{
    agent, apps, audit, catalog, hosts, images, migrations, networks, providers, relay, sites,
    tenancy, tokens, vms, watch,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "virt8ra",
        description = "Sovereign multi-provider cloud-edge control plane. Every call needs `Authorization: Bearer TOKEN` except /healthz, this document, and, public by design, this control plane's signed catalog (/api/v1/catalog) and its published images (/api/v1/catalog/images/{sha256}), which other control planes fetch and verify with the catalog's public key (given out of band: /api/v1/catalog/key needs the admin token). A missing, malformed, unknown, expired or revoked token is answered 401, a valid token of a kind or role the operation does not accept 403. A user token is scoped to a project (role viewer, member or admin), to a provider (operator) or to the platform; a project token sees only its project's resources, and another project's are answered 404. A platform admin picks the project of a call with the `X-Virt8ra-Project` header (lists show that project's, creates belong to it; without it, creates belong to `default`).",
        license(name = "Apache-2.0")
    ),
    paths(
        super::system::healthz, serve, super::system::metrics, super::metrics::scrape,
        providers::list, providers::create, providers::show, providers::update, providers::delete,
        sites::list, sites::create, sites::show, sites::update, sites::delete,
        hosts::list, hosts::show, hosts::update, hosts::delete, hosts::create_join_token,
        images::list, images::upload, images::show, images::delete, images::download,
        images::import_url, images::transfers, images::replicate,
        catalog::publish, catalog::list, catalog::show, catalog::unpublish, catalog::serve,
        catalog::public_key, catalog::image_data, catalog::add, catalog::refresh,
        catalog::list_catalogs, catalog::remove,
        apps::create, apps::list, apps::show, apps::delete,
        networks::list, networks::create, networks::show, networks::delete, networks::hosts,
        vms::list, vms::create, vms::plan, vms::show, vms::delete, vms::action, vms::console, vms::events, watch::watch,
        migrations::create, migrations::list, migrations::show, migrations::history,
        migrations::evacuate_host, migrations::evacuate_site, migrations::evacuate_provider, migrations::rebalance,
        migrations::export, migrations::show_export, migrations::delete_export,
        migrations::download, migrations::upload, migrations::staged,
        agent::join, agent::connect, agent::mux, relay::relay,
        tokens::list_join_tokens, tokens::revoke_join_token, tokens::rotate_admin_token,
        audit::list, audit::history, audit::usage,
        tenancy::whoami, tenancy::list_orgs, tenancy::create_org, tenancy::show_org, tenancy::delete_org,
        tenancy::list_projects, tenancy::create_project, tenancy::show_project, tenancy::delete_project,
        tenancy::list_users, tenancy::create_user, tenancy::show_user, tenancy::delete_user,
        tenancy::list_tokens, tenancy::create_token, tenancy::revoke_token,
        tenancy::show_quota, tenancy::set_quota,
    ),
    modifiers(&Bearer),
    tags(
        (name = "providers", description = "Operators that own sites"),
        (name = "sites", description = "Core and edge locations"),
        (name = "hosts", description = "Bare-metal hosts, registered by their agents"),
        (name = "images", description = "Content-addressed disk images"),
        (name = "vms", description = "Virtual machines"),
        (name = "networks", description = "Virtual networks: private layer 2 segments with an IPv4 subnet, across hosts, sites and providers"),
        (name = "migrations", description = "Moving VMs between hosts, sites, providers and countries; evacuation; export"),
        (name = "marketplace", description = "Appliances and signed catalogs"),
        (name = "apps", description = "One appliance deployed at several locations"),
        (name = "agent", description = "Host agents' endpoints"),
        (name = "audit", description = "Who did what (the audit log), where each VM's data has been (its residency trail), and what the use cost in money and carbon (showback)"),
        (name = "tenants", description = "Organisations, projects, users and their scoped API tokens"),
    )
)]
pub struct ApiDoc;

/// The bearer security scheme, and what every operation has in common.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for item in openapi.paths.paths.values_mut() {
            for op in operations(item) {
                complete(op);
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
        &mut item.head,
        &mut item.options,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

const UNAUTHORIZED: &str =
    "No token, a malformed `Authorization` header, or an unknown, expired or used-up token";
const MALFORMED: &str = "The body or a query parameter is malformed, unknown or out of range, or a WebSocket operation was called without an upgrade (the message says which)";
const FORBIDDEN: &str = "The token is valid but of a kind this operation does not accept, or it may not touch this resource";
const TOO_LARGE: &str = "The body is larger than this operation accepts";
const UNSUPPORTED: &str = "The body's `Content-Type` is not the one documented for it";

/// Adds 401 and 403 to an operation that needs a token, 400 to one that
/// takes a body or query parameters or upgrades to a WebSocket (their
/// extractors refuse what does not parse), 413 and 415 to one that takes a
/// body (too large, or of another content type), gives every answer a description, and makes the operation id
/// unique (`TAG_HANDLER`: the handlers' names repeat across modules).
fn complete(op: &mut Operation) {
    let needs_token = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let responses = &mut op.responses.responses;
    // A WebSocket operation (101) refuses a request that is no upgrade.
    let takes_input = op.request_body.is_some()
        || responses.contains_key("101")
        || op
            .parameters
            .iter()
            .flatten()
            .any(|p| p.parameter_in == ParameterIn::Query);
    let mut errors = vec![];
    if takes_input {
        errors.push(("400", MALFORMED));
    }
    if op.request_body.is_some() {
        errors.extend([("413", TOO_LARGE), ("415", UNSUPPORTED)]);
    }
    for (status, text) in errors {
        if !responses.contains_key(status) {
            responses.insert(status.into(), error_response(text));
        }
    }
    if needs_token {
        for (status, text) in [("401", UNAUTHORIZED), ("403", FORBIDDEN)] {
            let described = matches!(responses.get(status),
                Some(RefOr::T(r)) if !r.description.is_empty());
            if !described {
                responses.insert(status.into(), error_response(text));
            }
        }
    }
    for (status, r) in responses.iter_mut() {
        if let RefOr::T(r) = r {
            if r.description.is_empty() {
                r.description = reason(status).into();
            }
        }
    }
    if let (Some(tag), Some(id)) = (
        op.tags.as_ref().and_then(|t| t.first()),
        op.operation_id.as_mut(),
    ) {
        *id = format!("{tag}_{id}");
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

fn reason(status: &str) -> &'static str {
    status
        .parse::<u16>()
        .ok()
        .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Answer")
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
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use utoipa::OpenApi;

    use crate::http::{routes, Access};

    fn doc() -> Value {
        serde_json::to_value(super::ApiDoc::openapi()).unwrap()
    }

    /// `{name}` segments of a path, in order.
    fn segments(path: &str) -> Vec<&str> {
        path.split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect()
    }

    /// Every (METHOD, path) of the document, with its operation.
    fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
        let mut out = BTreeMap::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if [
                    "get", "put", "post", "delete", "patch", "head", "options", "trace",
                ]
                .contains(&method.as_str())
                {
                    out.insert((method.to_uppercase(), path.clone()), op.clone());
                }
            }
        }
        out
    }

    #[test]
    fn route_table_has_each_method_and_path_once_and_builds_a_router() {
        let table = routes();
        let keys: BTreeSet<_> = table.iter().map(|r| (&r.method, r.path)).collect();
        assert_eq!(
            keys.len(),
            table.len(),
            "a (method, path) is in the table twice"
        );
        // Axum panics on a conflicting route: building proves there is none.
        let mut router = axum::Router::<crate::state::Ctx>::new();
        for r in table {
            router = router.route(r.path, r.handler);
        }
        drop(router);
    }

    #[test]
    fn document_has_exactly_the_routes_of_the_table() {
        let documented: BTreeSet<_> = operations(&doc()).into_keys().collect();
        let table: BTreeSet<_> = routes()
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        let undocumented: Vec<_> = table.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&table).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the document: {undocumented:?}"
        );
        assert!(
            unrouted.is_empty(),
            "documented operations the router does not serve: {unrouted:?}"
        );
    }

    #[test]
    fn documented_parameters_are_where_the_router_takes_them() {
        let ops = operations(&doc());
        let mut wrong = Vec::new();
        for r in routes() {
            let Some(op) = ops.get(&(r.method.to_string(), r.path.to_string())) else {
                continue; // reported by document_has_exactly_the_routes_of_the_table
            };
            let what = format!("{} {}", r.method, r.path);
            let empty = Vec::new();
            let params = op["parameters"].as_array().unwrap_or(&empty);
            let segs: BTreeSet<&str> = segments(r.path).into_iter().collect();
            let mut in_path = BTreeSet::new();
            for p in params {
                let name = p["name"].as_str().unwrap_or_default();
                match p["location"].as_str().or(p["in"].as_str()) {
                    Some("path") => {
                        if !segs.contains(name) {
                            wrong.push(format!("{what}: `{name}` is documented as a path parameter but is no segment of the path"));
                        }
                        if p["required"] != true {
                            wrong.push(format!("{what}: path parameter `{name}` is not required"));
                        }
                        in_path.insert(name);
                    }
                    Some("query") | Some("header") => {
                        if segs.contains(name) {
                            wrong.push(format!(
                                "{what}: segment `{name}` is documented outside the path"
                            ));
                        }
                    }
                    other => wrong.push(format!("{what}: `{name}` is in {other:?}")),
                }
            }
            for s in segs.difference(&in_path) {
                wrong.push(format!("{what}: path segment `{s}` is not documented"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn security_401_and_403_are_documented_exactly_where_a_token_is_needed() {
        let ops = operations(&doc());
        let mut wrong = Vec::new();
        for r in routes() {
            let Some(op) = ops.get(&(r.method.to_string(), r.path.to_string())) else {
                continue;
            };
            let what = format!("{} {} ({:?})", r.method, r.path, r.access);
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            let documents = |status: &str| op["responses"].get(status).is_some();
            if r.access.needs_token() {
                if !secured {
                    wrong.push(format!("{what}: needs a token but documents no security"));
                }
                for status in ["401", "403"] {
                    if !documents(status) {
                        wrong.push(format!("{what}: needs a token but documents no {status}"));
                    }
                }
            } else {
                assert_eq!(r.access, Access::Anyone);
                if secured || documents("401") || documents("403") {
                    wrong.push(format!("{what}: public but documents security, 401 or 403"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn operations_with_a_body_document_400_413_and_415() {
        for ((method, path), op) in operations(&doc()) {
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415"] {
                    assert!(
                        op["responses"].get(status).is_some(),
                        "{method} {path} takes a body but documents no {status}"
                    );
                }
            }
        }
    }

    /// The documented bounds are the ones the server enforces, so that
    /// generated clients and fuzzers send what is accepted.
    #[test]
    fn documented_bounds_are_the_validated_ones() {
        use virt8ra_api::validate::{MAX_DISK_GIB, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
        let doc = doc();
        let vm = &doc["components"]["schemas"]["VmCreate"]["properties"];
        assert_eq!(vm["vcpus"]["maximum"], MAX_VCPUS);
        assert_eq!(vm["memory_mib"]["minimum"], MIN_MEMORY_MIB);
        assert_eq!(vm["memory_mib"]["maximum"], MAX_MEMORY_MIB);
        assert_eq!(vm["disk_gib"]["maximum"], MAX_DISK_GIB);
        let create = virt8ra_api::VmCreate {
            vcpus: MAX_VCPUS + 1,
            ..serde_json::from_value(serde_json::json!({"name": "a", "image": "i"})).unwrap()
        };
        assert!(virt8ra_api::validate::vm(&create).is_err());
    }

    #[test]
    fn operation_ids_are_unique_and_binary_bodies_are_binary_strings() {
        let ops = operations(&doc());
        let mut ids = BTreeSet::new();
        for ((method, path), op) in &ops {
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(
                ids.insert(id.to_string()),
                "{method} {path}: operation id {id:?} repeats"
            );
            let mut bodies = vec![&op["requestBody"]];
            bodies.extend(op["responses"].as_object().unwrap().values());
            for b in bodies {
                if let Some(schema) = b.pointer("/content/application~1octet-stream/schema") {
                    assert_eq!(
                        schema,
                        &serde_json::json!({"type": "string", "format": "binary"}),
                        "{method} {path}: an octet-stream body is not a binary string"
                    );
                }
            }
        }
        // The three uploads/downloads of raw bytes are among them.
        let octet =
            |m: &str, p: &str, at: &str| ops[&(m.to_string(), p.to_string())].pointer(at).is_some();
        assert!(octet(
            "POST",
            "/api/v1/images",
            "/requestBody/content/application~1octet-stream"
        ));
        assert!(octet(
            "PUT",
            "/api/v1/staging/{id}",
            "/requestBody/content/application~1octet-stream"
        ));
        assert!(octet(
            "GET",
            "/api/v1/images/{key}/data",
            "/responses/200/content/application~1octet-stream"
        ));
    }

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
