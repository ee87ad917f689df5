//! Discovery (RFC 7644 §4): ServiceProviderConfig, Schemas and ResourceTypes, which
//! say what this server offers. Apart because they read no tenant's data: what they say
//! comes from the config and the schemas.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{HandlerResult, LIST_SCHEMA, ScimQuery, St, authorize, ok, tenant_base};
use crate::scim::schema::{self, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, USER_SCHEMA};
use crate::scim::{ScimError, ScimResult};
use crate::server::AppState;

const SPC_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";
const RESOURCE_TYPE_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";

// ---------------------------------------------------------------------------------------
// Discovery (RFC 7644 §4)

fn spc_json(state: &AppState, tenant: &str) -> Value {
    let scim = &state.config.scim;
    json!({
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://github.com/rosterd/rosterd#readme",
        "patch": {"supported": true},
        "bulk": {
            "supported": true,
            "maxOperations": scim.bulk_max_operations,
            "maxPayloadSize": state.config.server.max_body_bytes,
        },
        "filter": {"supported": true, "maxResults": scim.max_results},
        // RFC 9865 §4: say that pages go by startIndex, so a cursor client does not try.
        "pagination": {
            "cursor": false,
            "index": true,
            "defaultPaginationMethod": "index",
            "defaultPageSize": scim.max_results,
            "maxPageSize": scim.max_results,
        },
        "changePassword": {"supported": false},
        "sort": {"supported": true},
        "etag": {"supported": true},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "A per-tenant bearer token created with `rosterd token new`.",
            "specUri": "https://www.rfc-editor.org/info/rfc6750",
            "primary": true,
        }],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": format!("{}/ServiceProviderConfig", tenant_base(state, tenant)),
        },
    })
}

pub(super) async fn service_provider_config(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    Ok(ok(spc_json(&st, &tenant)).into_response())
}

/// RFC 7644 §4: the discovery endpoints ignore sorting and paging, but a `filter` is 403,
/// so that a client cannot take the whole list for the matches.
fn refuse_filter(query: &[(String, String)]) -> ScimResult<()> {
    if query.iter().any(|(k, _)| k.eq_ignore_ascii_case("filter")) {
        return Err(ScimError::new(
            403,
            None,
            "the discovery endpoints (ServiceProviderConfig, Schemas, ResourceTypes) take no filter (RFC 7644 §4): read the whole list",
        ));
    }
    Ok(())
}

fn all_schemas(state: &AppState, tenant: &str) -> Vec<Value> {
    let base = tenant_base(state, tenant);
    [&schema::USER, &schema::ENTERPRISE_USER, &schema::GROUP]
        .into_iter()
        .map(|s| schema::schema_json(s, &base))
        .collect()
}

fn list_response(items: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": items.len(),
        "startIndex": 1,
        "itemsPerPage": items.len(),
        "Resources": items,
    })
}

pub(super) async fn schemas(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    Ok(ok(list_response(all_schemas(&st, &tenant))).into_response())
}

pub(super) async fn schema_by_id(
    State(st): St,
    Path((tenant, id)): Path<(String, String)>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    one_by_id(all_schemas(&st, &tenant), &id, "schema")
}

/// The discovery document whose `id` is `id` (any case), or 404 naming `what` it is.
fn one_by_id(documents: Vec<Value>, id: &str, what: &str) -> HandlerResult {
    documents
        .into_iter()
        .find(|d| d["id"].as_str().is_some_and(|d| d.eq_ignore_ascii_case(id)))
        .map(|d| ok(d).into_response())
        .ok_or_else(|| ScimError::not_found(format!("{what} {id:?} not found")).into())
}

fn all_resource_types(state: &AppState, tenant: &str) -> Vec<Value> {
    let base = tenant_base(state, tenant);
    vec![
        json!({
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": "User",
            "name": "User",
            "endpoint": "/Users",
            "description": "User Account",
            "schema": USER_SCHEMA,
            "schemaExtensions": [{"schema": ENTERPRISE_USER_SCHEMA, "required": false}],
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/User")},
        }),
        json!({
            "schemas": [RESOURCE_TYPE_SCHEMA],
            "id": "Group",
            "name": "Group",
            "endpoint": "/Groups",
            "description": "Group",
            "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/Group")},
        }),
    ]
}

pub(super) async fn resource_types(
    State(st): St,
    Path(tenant): Path<String>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    Ok(ok(list_response(all_resource_types(&st, &tenant))).into_response())
}

pub(super) async fn resource_type_by_id(
    State(st): St,
    Path((tenant, id)): Path<(String, String)>,
    q: ScimQuery,
    headers: HeaderMap,
) -> HandlerResult {
    authorize(&st, &tenant, &headers)?;
    refuse_filter(&q.read()?)?;
    one_by_id(all_resource_types(&st, &tenant), &id, "resource type")
}
