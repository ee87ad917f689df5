//! The OpenAPI 3.1 description of the Roster API, served at `/api/v1/openapi.json`. An
//! integration test walks every operation listed here against the running daemon, so the
//! document cannot name a route the router does not serve.
use serde_json::{Value, json};

use crate::store::EVENT_KINDS;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// [`error_response`] for a 429, which tells when to ask again.
fn busy_response(description: &str) -> Value {
    let mut r = error_response(description);
    r["headers"] = json!({"Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "integer"}}});
    r
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string"}})
}

/// A dead letter's id, as `listDeadLetters` gives it (`letter_id` reads it).
fn letter_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "The dead letter's id", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}})
}

/// RFC 6750's challenge, which `ApiError::into_response` sets.
fn with_challenge(response: Value, when: &str) -> Value {
    with_header(response, "WWW-Authenticate", when)
}

fn with_header(mut response: Value, name: &str, description: &str) -> Value {
    response["headers"] = json!({name: {
        "description": description,
        "schema": {"type": "string"}
    }});
    response
}

/// A request with two Authorization headers is refused by every operation.
const TWO_AUTHORIZATIONS: &str = "two Authorization headers (invalid_request)";

fn common_errors(mut responses: Value, extra: &[(&str, &str)]) -> Value {
    if let Some(map) = responses.as_object_mut() {
        map.insert(
            "401".into(),
            with_challenge(
                error_response("Missing, malformed, expired or wrongly signed JWT (the token_* codes)"),
                "Bearer realm=\"rosterd\", with error=\"invalid_token\" when a token was sent and refused",
            ),
        );
        map.insert(
            "403".into(),
            with_challenge(
                error_response("Missing scope (insufficient_scope), X-Tenant does not match the token's tenant (tenant_mismatch), or the token's tenant is not served here (unknown_tenant)"),
                "On insufficient_scope only: Bearer realm=\"rosterd\", error=\"insufficient_scope\", scope=\"<the scope needed>\"",
            ),
        );
        map.insert(
            "500".into(),
            error_response("An unexpected failure, logged by the daemon (internal)"),
        );
        map.insert(
            "503".into(),
            error_response("The Roster API is not configured on this daemon (roster_api_disabled), or the store failed (store_failed, with Retry-After)"),
        );
        for (code, d) in extra {
            map.insert((*code).into(), error_response(d));
        }
        // Every operation refuses these, whatever else its 400 says.
        let bad = match map.get("400").and_then(|r| r["description"].as_str()) {
            Some(d) => {
                format!("{d}; an unknown or repeated query parameter; or {TWO_AUTHORIZATIONS}")
            }
            None => format!("Unknown or repeated query parameter, or {TWO_AUTHORIZATIONS}"),
        };
        map.insert("400".into(), error_response(&bad));
        map.insert(
            "405".into(),
            with_header(
                error_response("The path does not take this method (method_not_allowed)"),
                "Allow",
                "The methods the path takes",
            ),
        );
    }
    responses
}

fn user_filters() -> Vec<Value> {
    vec![
        query(
            "archetype",
            "Only users with this archetype: one of the bundle's, or one that overrides still hold (else 400 invalid_archetype)",
            json!({"type": "string", "minLength": 1}),
        ),
        query(
            "active",
            "true (default), false, or any (all is the same as any); any letter case",
            json!({"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[Aa][Nn][Yy]|[Aa][Ll][Ll])$", "default": "true"}),
        ),
        query(
            "email",
            "Exact match (case-insensitive) on any of the user's e-mail addresses, or a userName that is one; the email field shows one of them (the primary, else the work one, else the first)",
            json!({"type": "string"}),
        ),
        query(
            "manager_user_id",
            "Direct reports of this manager (user:<userName> or SCIM id; a value that names no user is 400)",
            json!({"type": "string", "minLength": 1}),
        ),
        query(
            "department",
            "Department, case-insensitive",
            json!({"type": "string"}),
        ),
        query(
            "group",
            "Members of this group (SCIM id, displayName or externalId; a value that names no group, or that several groups answer to by displayName or externalId, is 400)",
            json!({"type": "string", "minLength": 1}),
        ),
        query(
            "archetype_confidence__lt",
            "Only assignments with confidence below this",
            json!({"type": "number"}),
        ),
    ]
}

/// A page size: 1 to 1000, 100 when not given (`parse_limit`).
fn limit() -> Value {
    query(
        "limit",
        "Page size, 1 to 1000",
        json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
    )
}

/// `limit` and `cursor`; `cursor` says what a cursor is bound to on this endpoint.
fn paging(cursor: &str) -> Vec<Value> {
    vec![
        limit(),
        query("cursor", cursor, json!({"type": "string", "minLength": 1})),
    ]
}

pub fn openapi_document() -> Value {
    let mut list_params = user_filters();
    list_params.extend(paging(
        "The next_cursor of the previous page of the same query: the same filters as the listing reads them (active=TRUE or no active for the default, all for any, department in any case, a user or group by any of its names) and tenant; limit may change. Anything else is 400",
    ));
    let mut export_params = user_filters();
    export_params.push(query(
        "format",
        "Only csv",
        json!({"type": "string", "enum": ["csv"]}),
    ));
    let user_ref = json!({"$ref": "#/components/schemas/User"});
    let assignment_ref = json!({"$ref": "#/components/schemas/AssignmentResult"});
    let sec = json!([{"bearer": []}]);
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rosterd Roster API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The per-tenant roster: users with their archetype assignments, overrides, review queue, governance events and sync jobs. Tenant and scopes come from the JWT; an X-Tenant header, when sent, must match. A method a path does not list answers 405 method_not_allowed, with an Allow header."
        },
        "servers": [{"url": "/"}],
        "security": sec,
        "paths": {
            "/api/v1/roster/users": {"get": {
                "operationId": "listUsers", "summary": "List users",
                "parameters": list_params,
                "responses": common_errors(json!({"200": ok_json("A page of users", json!({
                    "type": "object", "required": ["users"],
                    "properties": {"users": {"type": "array", "items": user_ref}, "next_cursor": {"type": ["string", "null"]}}
                })), "400": error_response("Unknown parameter or bad value")}), &[])
            }},
            "/api/v1/roster/users/{user_id}": {
                "parameters": [path_param("user_id", "user:<userName> or the SCIM id")],
                "get": {
                    "operationId": "getUser", "summary": "One user",
                    "responses": common_errors(json!({"200": ok_json("The user", user_ref)}), &[("404", "User not found")])
                },
                "patch": {
                    "operationId": "overrideArchetype", "summary": "Set or clear a manual archetype override (roster:write)",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["archetype_id"], "additionalProperties": false,
                        "properties": {"archetype_id": {"type": ["string", "null"], "minLength": 1, "description": "null clears the override"}}
                    }}}},
                    "responses": common_errors(json!({"200": ok_json("The assignment now in force", assignment_ref.clone())}), &[
                        ("400", "archetype_id not in the tenant's bundle, or a malformed body"),
                        ("404", "User not found"),
                        ("409", "A sync job is running for the tenant (sync_in_progress), or the tenant has no archetype bundle (no_bundle)"),
                        ("422", "Tenant policy forbids manual overrides (setting one; clearing one is allowed); answered before the archetype_id is checked"),
                    ])
                }
            },
            "/api/v1/roster/users:export": {"get": {
                "operationId": "exportUsers", "summary": "The roster as CSV, streamed",
                "parameters": export_params,
                "responses": common_errors(json!({"200": {"description": "RFC 4180 CSV with columns user_id,email,first_name,last_name,job_title,department,manager,archetype_id,archetype_confidence,is_active,groups; cells beginning with = + - @ are prefixed with '",
                    "content": {"text/csv": {"schema": {"type": "string"}}}}, "400": error_response("Unknown parameter or format"),
                    "429": busy_response(&format!(
                        "Every export slot is taken ({} a tenant, {} in all): too_many_exports, with Retry-After",
                        super::export::EXPORTS_PER_TENANT,
                        super::export::EXPORTS_IN_ALL
                    ))}), &[])
            }},
            "/api/v1/roster/archetype:bulk-assign": {"post": {
                "operationId": "bulkAssign", "summary": "Override (or, with null, clear the override of) many users' archetypes (roster:write)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["assignments"], "additionalProperties": false,
                    "properties": {"assignments": {"type": "array", "maxItems": 10000, "items": {
                        "type": "object", "required": ["user_id", "archetype_id"], "additionalProperties": false,
                        "description": "An item that breaks this schema, or names a user an earlier item named (by userName or SCIM id: one item per user), fails alone, with a per-item 400",
                        "properties": {"user_id": {"type": "string", "minLength": 1}, "archetype_id": {"type": ["string", "null"], "minLength": 1, "description": "null clears the override"}}}}}
                }}}},
                "responses": common_errors(json!({"200": ok_json("Per-item outcome", json!({
                    "type": "object", "required": ["updated", "failed", "errors"],
                    "properties": {"updated": {"type": "integer"}, "failed": {"type": "integer"},
                        "errors": {"type": "array", "description": "One per item that failed: 400 (a bad item), 404 (no such user), 422 (override_forbidden), 409 (sync_in_progress: the item met a sync job running while the list was applied; the other items stand, send those listed again once it ends)", "items": {"type": "object", "required": ["index", "user_id", "status", "error", "message"], "properties": {
                            "index": {"type": "integer"}, "user_id": {"type": "string"}, "status": {"type": "integer"},
                            "error": {"type": "string"}, "message": {"type": "string"}}}}}
                })), "400": error_response("Malformed body, or more than 10,000 items")}), &[
                    ("409", "A sync job is running for the tenant (sync_in_progress), or the tenant has no archetype bundle (no_bundle)"),
                ])
            }},
            "/api/v1/roster/archetypes": {"get": {
                "operationId": "listArchetypes", "summary": "The tenant's archetypes with user counts",
                "responses": common_errors(json!({"200": ok_json("Archetypes", json!({
                    "type": "object", "required": ["bundle_version", "archetypes"], "properties": {"bundle_version": {"type": "string"}, "archetypes": {"type": "array", "items": {
                        "type": "object", "required": ["archetype_id", "title", "function_focus", "default_cowork_id", "user_count", "active_user_count", "in_bundle"], "properties": {
                            "archetype_id": {"type": "string"}, "title": {"type": ["string", "null"]},
                            "function_focus": {"type": "array", "items": {"type": "string"}},
                            "default_cowork_id": {"type": ["string", "null"]}, "user_count": {"type": "integer"},
                            "active_user_count": {"type": "integer"},
                            "in_bundle": {"type": "boolean", "description": "false: not in the bundle any more, held by manual overrides made before it was dropped"}}}}}
                })), "400": error_response("Any query parameter: this endpoint takes none")}), &[("409", "No archetype bundle is configured")])
            }},
            "/api/v1/roster/groups": {"get": {
                "operationId": "listGroups", "summary": "Groups with member counts",
                "responses": common_errors(json!({"200": ok_json("Groups", json!({
                    "type": "object", "required": ["groups"], "properties": {"groups": {"type": "array", "items": {
                        "type": "object", "required": ["group_id", "display_name", "external_id", "source", "member_count", "claresia_role", "archetype_rule"], "properties": {
                            "group_id": {"type": "string"}, "display_name": {"type": ["string", "null"]},
                            "external_id": {"type": ["string", "null"]}, "source": {"type": "string"},
                            "member_count": {"type": "integer", "description": "Direct members, users and nested groups alike; the users filter group= lists the users among them"},
                            "claresia_role": {"type": "string", "description": "The role the group grants: the tenant's group_roles, else member"},
                            "archetype_rule": {"type": ["string", "null"]}}}}}
                })), "400": error_response("Any query parameter: this endpoint takes none")}), &[])
            }},
            "/api/v1/roster/review": {"get": {
                "operationId": "listReview", "summary": "Users whose automatic assignment is below the review threshold",
                "parameters": paging("The next_cursor of the previous page of this tenant's queue; limit may change. Anything else is 400"),
                "responses": common_errors(json!({"200": ok_json("Review items", json!({
                    "type": "object", "required": ["review_threshold", "total", "items", "next_cursor"], "properties": {
                        "review_threshold": {"type": ["number", "null"]}, "total": {"type": "integer"},
                        "next_cursor": {"type": ["string", "null"]},
                        "items": {"type": "array", "items": {"type": "object", "required": ["user_id", "scim_id", "email", "job_title", "department", "is_active", "archetype_id", "archetype_confidence", "archetype_assigned_by", "archetype_assigned_at", "candidates"], "properties": {
                            "user_id": {"type": "string"}, "scim_id": {"type": "string"},
                            "email": {"type": ["string", "null"]},
                            "job_title": {"type": ["string", "null"]}, "department": {"type": ["string", "null"]},
                            "is_active": {"type": "boolean"},
                            "archetype_id": {"type": ["string", "null"]}, "archetype_confidence": {"type": "number"},
                            "archetype_assigned_by": {"type": "string"},
                            "archetype_assigned_at": {"type": "string", "format": "date-time"},
                            "candidates": {"type": "array", "description": "The classifier's pick first, then the runners-up by the confidence shown", "items": {"type": "object", "required": ["archetype_id", "confidence"], "properties": {
                                "archetype_id": {"type": "string"}, "confidence": {"type": "number"}}}}}}}}
                })), "400": error_response("Bad paging parameter")}), &[])
            }},
            "/api/v1/roster/review/{user_id}/accept": {"post": {
                "operationId": "acceptReview", "summary": "Resolve a review item: accept the suggestion (no body, {} or archetype_id null) or choose an archetype (roster:write)",
                "parameters": [path_param("user_id", "user:<userName> or the SCIM id")],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": false,
                    "not": {"description": "Not both at once", "required": ["archetype_id", "expected_archetype_id"], "properties": {"archetype_id": {"type": "string"}, "expected_archetype_id": {"type": "string"}}},
                    "properties": {
                        "archetype_id": {"type": ["string", "null"], "minLength": 1, "description": "Omitted or null accepts the suggestion"},
                        "expected_archetype_id": {"type": ["string", "null"], "minLength": 1, "description": "Accept the suggestion only while it is this archetype (the one the reviewer was shown); 409 suggestion_changed when the user's title or department has changed it since. Not with archetype_id"}}}}}},
                "responses": common_errors(json!({"200": ok_json("The assignment now in force", assignment_ref.clone())}), &[
                    ("400", "archetype_id or expected_archetype_id not in the bundle, or nothing to accept"),
                    ("404", "User not found"),
                    ("409", "A sync job is running for the tenant (sync_in_progress), the user is not in the review queue (not_in_review), the suggestion is no longer expected_archetype_id (suggestion_changed), or the tenant has no archetype bundle (no_bundle)"),
                    ("422", "Tenant policy forbids manual overrides; answered before the archetype is checked"),
                ])
            }},
            "/api/v1/roster/events": {"get": {
                "operationId": "listEvents", "summary": "Governance events (assignment changes), oldest first",
                "parameters": [
                    query("user_id", "Only this user: user:<userName> (the user who has the name now; when none does, the deleted user who last had it, whose history stays readable) or SCIM id (a deleted user's too)", json!({"type": "string", "minLength": 1})),
                    query("kind", "One kind of event", json!({"type": "string", "enum": EVENT_KINDS})),
                    query("since", "RFC 3339 time, inclusive", json!({"type": "string", "format": "date-time"})),
                    query("until", "RFC 3339 time, inclusive", json!({"type": "string", "format": "date-time"})),
                    query("after", "Only events after this seq (next_after of the previous page)", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})),
                    limit()
                ],
                "responses": common_errors(json!({"200": ok_json("Events", json!({
                    "type": "object", "required": ["events", "next_after"], "properties": {"next_after": {"type": ["integer", "null"]}, "events": {"type": "array", "items": {
                        "type": "object", "required": ["seq", "at", "kind", "user_id", "scim_id", "actor", "before", "after"], "properties": {
                            "seq": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                            "kind": {"type": "string"}, "user_id": {"type": "string"}, "scim_id": {"type": "string"},
                            "actor": {"type": "string"},
                            "before": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/AssignmentState"}]},
                            "after": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/AssignmentState"}]}}}}}
                })), "400": error_response("Bad parameter, an unknown kind, or since after until")}), &[("404", "user_id names no user, present or deleted")])
            }},
            "/api/v1/roster/scim:sync": {"post": {
                "operationId": "startSync", "summary": "Start the reconcile job: reclassify the tenant, then re-send what drifted downstream (roster:write). Body {\"dry_run\": true} only reports, and is answered even while a job runs; {\"full\": true} sends every object to each OneRoster connector again (and the course), for a target that lost data; {\"connector\": NAME} reconciles that connector alone (404 if the tenant has no connector of that name, 409 if it is not loaded).",
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"dry_run": {"type": "boolean"}, "full": {"type": "boolean"}, "connector": {"type": "string", "description": "Only this connector; the others, held or paused, neither run nor fail the job"}}, "additionalProperties": false}}}},
                "responses": common_errors(json!({
                    "202": ok_json("The queued job", json!({"$ref": "#/components/schemas/Job"})),
                    "200": ok_json("Dry run: what each connector would send", json!({"type": "object", "required": ["dry_run", "full", "connectors"], "properties": {
                        "dry_run": {"type": "boolean"}, "full": {"type": "boolean"}, "connectors": {"type": "array", "items": {"$ref": "#/components/schemas/DriftReport"}}}})),
                    "400": error_response("Malformed body"),
                    "404": error_response("The tenant has no connector of the name given as `connector` (not_found)"),
                    "429": busy_response("A dry run of this tenant is running: one runs at a time (dry_run_in_progress), with Retry-After")
                }), &[("409", "A job is already running for this tenant (sync_in_progress), or the connector named is disabled or not loaded (its file does not load, no file names it, or it is retired: the message says what loads it again) (conflict)")])
            }},
            "/api/v1/roster/changes": {"get": {
                "operationId": "listChanges", "summary": "The change feed: committed changes after a sequence number, oldest first",
                "parameters": [
                    query("since", "Only changes with a larger seq (next_since of the previous page); default 0", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})),
                    limit()
                ],
                "responses": common_errors(json!({"200": ok_json("Changes", json!({"type": "object", "required": ["changes", "next_since", "last_seq", "compacted_upto"], "properties": {
                    "changes": {"type": "array", "items": {"$ref": "#/components/schemas/Change"}},
                    "next_since": {"type": "integer"}, "last_seq": {"type": "integer"},
                    "compacted_upto": {"type": "integer", "description": "The last change compaction removed (0 when none was): a reader whose since is below it missed the changes from since + 1 up to it, and should read the roster afresh"}}})),
                    "400": error_response("Bad parameter")}), &[])
            }},
            "/api/v1/roster/connectors": {"get": {
                "operationId": "listConnectors", "summary": "The tenant's connectors and how they are doing",
                "responses": common_errors(json!({"200": ok_json("Connectors", json!({"type": "object", "properties": {"connectors": {"type": "array", "items": {"$ref": "#/components/schemas/Connector"}}}}))}), &[])
            }},
            "/api/v1/roster/connectors/{name}": {"get": {
                "operationId": "getConnector", "summary": "One connector's status",
                "parameters": [path_param("name", "The connector's name")],
                "responses": common_errors(json!({"200": ok_json("Connector", json!({"$ref": "#/components/schemas/Connector"}))}), &[("404", "No such connector for this tenant, loaded or kept in the store"), ("409", "The connector is not loaded (no file names it, its file does not load, or it is retired): the message says why and what loads it again (conflict)")])
            }},
            "/api/v1/roster/connectors/{name}/resume": {"post": {
                "operationId": "resumeConnector", "summary": "Lift a connector's pause now, or let go the deprovisioning its [guard] holds (roster:admin). Body {\"skip_held\": true}, for a connector its guard holds: send none of the held changes (its cursor moves past every change logged by now) and start a reconciliation, which sends the current state of what they changed; refused for a webhook connector.",
                "parameters": [path_param("name", "The connector's name")],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"skip_held": {"type": "boolean"}}, "additionalProperties": false}}}},
                "responses": common_errors(json!({"200": ok_json("Resumed, or it was not paused (`was_paused`)", json!({"type": "object", "required": ["resumed", "was_paused"], "properties": {"resumed": {"type": "string", "description": "The connector's name"}, "was_paused": {"type": "boolean", "description": "Whether the connector was paused; false when there was no pause to lift (its count of failures in a row starts afresh all the same, and requests waiting to retry try at once)"}, "dead_letters": {"type": "integer", "description": "Without skip_held: the connector's dead letters, which the resume does not send (replay them)"}, "skipped_through": {"type": "integer", "description": "With skip_held: the held changes up to this one were skipped (for a CSV connector, see `note`)"}, "note": {"type": "string", "description": "With skip_held, for a CSV connector: its files are written again from the roster as it stands now, held changes the identity provider has not undone included"}, "job": {"$ref": "#/components/schemas/Job"}, "job_error": {"type": "string", "description": "With skip_held: why the reconciliation did not start (another job runs); start it once that ends"}}})), "400": error_response("The body is not {\"skip_held\": true|false}")}), &[("404", "No such connector for this tenant, loaded or kept in the store"), ("409", "The connector is disabled or failed to start: nothing runs to resume; or it is not loaded (no file names it, its file does not load, or it is retired: the message says why and what loads it again); or, with skip_held, it is not held by its guard, or is a webhook connector (conflict)")])
            }},
            "/api/v1/roster/connectors/{name}/retire": {"post": {
                "operationId": "retireConnector", "summary": "Stop a connector that is not loaded from holding back change-log compaction: it is gone for good (roster:admin)",
                "parameters": [path_param("name", "The connector's name")],
                "responses": common_errors(json!({"200": ok_json("Retired", json!({"type": "object", "required": ["retired", "undelivered", "was_retired"], "properties": {"retired": {"type": "string", "description": "The connector's name"}, "undelivered": {"type": "integer", "description": "Changes it had not delivered, which compaction may now drop (0 when it was already retired)"}, "dead_letters": {"type": "integer", "description": "Its dead letters, which stay in the store until discarded (listDeadLetters and discardDeadLetters still take a retired connector)"}, "was_retired": {"type": "boolean", "description": "It was retired already, and nothing changed"}}}))}), &[("404", "No stored cursor of that name holds compaction for this tenant, and none was retired under it"), ("409", "The connector is loaded (remove its file and reload), or a connector file that does not load may name it (conflict)")])
            }},
            "/api/v1/roster/connectors/{name}/dead-letters": {"get": {
                "operationId": "listDeadLetters", "summary": "Changes the target refused, with request, answer and reason, oldest first",
                "description": "Also for a connector that is not loaded (no file names it, or its file does not load) or is retired, as long as the store keeps its cursor or dead letters: /status lists them (unloaded_connectors, retired_connectors).",
                "parameters": [path_param("name", "The connector's name"), limit(),
                    query("after", "Only letters with a larger id (next_after of the previous page)", json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}))],
                "responses": common_errors(json!({"200": ok_json("Dead letters", json!({"type": "object", "required": ["dead_letters", "next_after", "total"], "properties": {
                    "dead_letters": {"type": "array", "items": {"$ref": "#/components/schemas/DeadLetter"}},
                    "next_after": {"type": ["integer", "null"], "description": "What to pass as after for the next page; null on the last page"},
                    "total": {"type": "integer", "description": "How many dead letters the connector holds"}}})),
                    "400": error_response("Bad limit or after")}), &[("404", "No such connector for this tenant, loaded or kept in the store")])
            }},
            "/api/v1/roster/connectors/{name}/dead-letters/{id}": {"delete": {
                "operationId": "discardDeadLetter", "summary": "Drop a dead letter (roster:admin)",
                "description": "Also for a connector that is not loaded or is retired, as listDeadLetters.",
                "parameters": [path_param("name", "The connector's name"), letter_id_param()],
                "responses": common_errors(json!({"204": {"description": "Discarded"}, "400": error_response("id is not a number")}), &[("404", "No such connector (loaded or kept in the store) or dead letter"), ("409", "A replay of this letter is sending it now; it is removed if the target takes it")])
            }},
            "/api/v1/roster/connectors/{name}/dead-letters/{id}/replay": {"post": {
                "operationId": "replayDeadLetter", "summary": "Send a dead letter again, once; removed on success (roster:admin)",
                "description": "A OneRoster connector is sent the object's state as stored now (or its delete), not the letter's snapshot, so a replay never undoes a later change. A webhook is sent the original event (same webhook-id and data.seq); superseded_by lists later changes of the object the connector has passed (delivered, or dead letters themselves).",
                "parameters": [path_param("name", "The connector's name"), letter_id_param()],
                "responses": common_errors(json!({"200": ok_json("Replayed", json!({"type": "object", "required": ["replayed", "sent", "superseded_by"], "properties": {
                        "replayed": {"type": "integer", "description": "The dead letter's id"},
                        "sent": {"type": "string", "enum": ["current_state", "original_event"], "description": "What was sent"},
                        "superseded_by": {"type": "array", "items": {"type": "integer"}, "description": "Sequence numbers of later changes of the same object the connector has passed, delivered or set aside as dead letters (at most 20)"},
                        "note": {"type": ["string", "null"], "description": "Set when the letter is older than changes the connector has passed"}}})),
                    "400": error_response("id is not a number"),
                    "422": error_response("Nothing was sent: the object cannot be expressed for this target, such as a user without an email for OneRoster (unmappable)"),
                    "502": error_response("The target refused the replay (target_refused)")}),
                    &[("404", "No such connector or dead letter"), ("409", "The connector is disabled, not running, not loaded (no file names it, its file does not load, or it is retired: the message says what loads it again) or held by its guard (for a OneRoster connector also a hold it has not reached yet since a start or reload, judged from the store), or another request is replaying this letter now")])
            }},
            "/api/v1/roster/connectors/{name}/dead-letters:replay": {"post": {
                "operationId": "replayDeadLetters", "summary": "Replay several dead letters, in the order given (roster:admin)",
                "description": "Each letter is replayed as replayDeadLetter would, and its outcome is its own: one refused does not stop the others. The change log is read once for the whole call. Letters are started for about 20 s; those not begun by then are listed in not_attempted, to send again. `rosterd dead-letters replay --all` uses it.",
                "parameters": [path_param("name", "The connector's name")],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["ids"], "additionalProperties": false, "properties": {
                    "ids": {"type": "array", "minItems": 1, "maxItems": super::mirror::REPLAY_BATCH_MAX, "uniqueItems": true, "items": {"type": "integer", "minimum": 0}, "description": "Dead letter ids, replayed in this order"}}}}}},
                "responses": common_errors(json!({"200": ok_json("Each letter's outcome", json!({"type": "object", "required": ["results", "not_attempted"], "properties": {
                        "results": {"type": "array", "items": {"type": "object", "required": ["id", "status"], "properties": {
                            "id": {"type": "integer"},
                            "status": {"type": "integer", "description": "What replayDeadLetter would have answered for this letter: 200, or its error's status (404, 409, 422, 502, …)"},
                            "replayed": {"type": "integer"},
                            "sent": {"type": "string", "enum": ["current_state", "original_event"]},
                            "superseded_by": {"type": "array", "items": {"type": "integer"}},
                            "note": {"type": ["string", "null"]},
                            "error": {"type": "string", "description": "Set when status is not 200: the error code replayDeadLetter would give"},
                            "message": {"type": "string"}}}},
                        "not_attempted": {"type": "array", "items": {"type": "integer"}, "description": "Ids not begun within the call's time; send them again"}}})),
                    "400": error_response("ids missing, empty, over the limit, repeated, or not numbers")}),
                    &[("404", "No such connector"), ("409", "The connector is disabled, not running or not loaded (no file names it, its file does not load, or it is retired)")])
            }},
            "/api/v1/roster/connectors/{name}/dead-letters:discard": {"post": {
                "operationId": "discardDeadLetters", "summary": "Drop several dead letters at once (roster:admin)",
                "description": "Each letter is dropped as discardDeadLetter would, and its outcome is its own: one a replay is sending (409) or one gone already (404) does not keep the others. All go in one store write. `rosterd dead-letters discard --all` uses it. Also for a connector that is not loaded or is retired, as listDeadLetters.",
                "parameters": [path_param("name", "The connector's name")],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["ids"], "additionalProperties": false, "properties": {
                    "ids": {"type": "array", "minItems": 1, "maxItems": super::mirror::REPLAY_BATCH_MAX, "uniqueItems": true, "items": {"type": "integer", "minimum": 0}, "description": "Dead letter ids"}}}}}},
                "responses": common_errors(json!({"200": ok_json("Each letter's outcome, in the order given", json!({"type": "object", "required": ["results"], "properties": {
                        "results": {"type": "array", "items": {"type": "object", "required": ["id", "status"], "properties": {
                            "id": {"type": "integer"},
                            "status": {"type": "integer", "description": "What discardDeadLetter would have answered for this letter: 204, or its error's status (404, 409)"},
                            "error": {"type": "string", "description": "Set when status is not 204: the error code discardDeadLetter would give"},
                            "message": {"type": "string"}}}}}})),
                    "400": error_response("ids missing, empty, over the limit, repeated, or not numbers")}),
                    &[("404", "No such connector for this tenant, loaded or kept in the store")])
            }},
            "/api/v1/roster/scim/jobs/{job_id}": {"get": {
                "operationId": "getJob", "summary": "A sync job's state and counts",
                "parameters": [path_param("job_id", "The job_id scim:sync returned")],
                "responses": common_errors(json!({"200": ok_json("The job", json!({"$ref": "#/components/schemas/Job"}))}), &[("404", "No such job")])
            }},
            "/api/v1/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}}
            }}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "HS256, RS256 or ES256; claims: sub (not blank, no control, line-break, invisible or text-direction characters; else 401 token_missing_claim), exp, aud, tenant (configurable), scope (roster:read roster:write roster:admin)"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string", "description": error_codes_description()},
                    "message": {"type": "string"}}},
                "User": {"type": "object", "required": USER_FIELDS, "properties": {
                    "user_id": {"type": "string"}, "scim_id": {"type": "string"},
                    "email": {"type": ["string", "null"]}, "first_name": {"type": ["string", "null"]},
                    "last_name": {"type": ["string", "null"]}, "job_title": {"type": ["string", "null"]},
                    "department": {"type": ["string", "null"]}, "manager_user_id": {"type": ["string", "null"]},
                    "archetype_id": {"type": ["string", "null"]}, "archetype_confidence": {"type": ["number", "null"]},
                    "archetype_assigned_by": {"type": ["string", "null"]},
                    "archetype_assigned_at": {"type": ["string", "null"], "format": "date-time"},
                    "is_active": {"type": "boolean"}, "scim_external_id": {"type": ["string", "null"]},
                    "groups": {"type": "array", "items": {"type": "string"}, "description": "The user's groups by group_id (as GET /groups lists them), sorted"},
                    "group_names": {"type": "array", "items": {"type": "string"}, "description": "The display names of groups, in the same order"}}},
                "AssignmentState": {"type": "object", "required": ["archetype_id", "archetype_confidence", "archetype_assigned_by", "archetype_assigned_at", "source", "bundle_version", "needs_review", "candidates"], "properties": {
                    "archetype_id": {"type": ["string", "null"]}, "archetype_confidence": {"type": "number"},
                    "archetype_assigned_by": {"type": "string"},
                    "archetype_assigned_at": {"type": "string", "format": "date-time"},
                    "source": {"type": "string", "enum": ["override", "group", "classifier", "default", "unassigned"]},
                    "bundle_version": {"type": "string"}, "needs_review": {"type": "boolean"},
                    "candidates": {"type": "array", "items": {"type": "object", "required": ["archetype_id", "confidence"], "properties": {
                        "archetype_id": {"type": "string"}, "confidence": {"type": "number"}}}}}},
                "AssignmentResult": {"type": "object", "required": ["user_id", "archetype_id", "archetype_confidence", "archetype_assigned_by", "archetype_assigned_at"], "properties": {
                    "user_id": {"type": "string"}, "archetype_id": {"type": ["string", "null"]},
                    "archetype_confidence": {"type": "number"}, "archetype_assigned_by": {"type": "string"},
                    "archetype_assigned_at": {"type": "string", "format": "date-time"}}},
                "Connector": {"type": "object", "properties": {
                    "name": {"type": "string"}, "tenant": {"type": "string"}, "kind": {"type": "string", "enum": ["oneroster", "webhook", "csv"]},
                    "file": {"type": "string"}, "file_error": {"type": ["string", "null"], "description": "Why its file does not load now; it runs on the config it was last loaded with"},
                    "enabled": {"type": "boolean"}, "dry_run": {"type": "boolean"}, "state": {"type": "string"},
                    "cursor": {"type": "integer"}, "lag_events": {"type": "integer"}, "lag_seconds": {"type": "number"},
                    "last_success_at": {"type": ["string", "null"], "format": "date-time"},
                    "last_error": {"type": ["string", "null"]}, "last_error_at": {"type": ["string", "null"], "format": "date-time"},
                    "paused": {"type": "boolean"}, "paused_until": {"type": ["string", "null"], "format": "date-time"},
                    "held_by_guard": {"type": ["string", "null"], "description": "Why its [guard] holds it until resumed (`held by its [guard]: change #N would make …`, and what to run); null when not held. Kept apart from last_error, which a failure of an earlier change overwrites"},
                    "next_retry_at": {"type": ["string", "null"], "format": "date-time", "description": "The soonest attempt ahead of a request waiting to retry (its backoff, or the target's Retry-After); null when none waits, and while paused (paused_until is the next attempt then)"},
                    "next_write_at": {"type": ["string", "null"], "format": "date-time", "description": "A csv connector with a schedule: when it writes its files next, while it waits for that time; null otherwise (writing, retrying a failed write, or no schedule)"},
                    "dead_letters": {"type": "integer"}, "delivered": {"type": "integer"}, "retries": {"type": "integer"}}},
                "Job": {"type": "object", "required": ["job_id", "kind", "status", "started_at", "finished_at", "counts", "error"], "properties": {
                    "job_id": {"type": "string"}, "kind": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "interrupted"]},
                    "started_at": {"type": "string", "format": "date-time"},
                    "finished_at": {"type": ["string", "null"], "format": "date-time"},
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "error": {"type": ["string", "null"]},
                    "full": {"type": "boolean", "description": "Present, true, on a reconciliation that sent every object again"},
                    "connector": {"type": "string", "description": "Present on a reconciliation of this connector alone"}}},
                "Change": {"type": "object", "required": ["seq", "at", "resource_type", "id", "op"], "properties": {
                    "seq": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                    "resource_type": {"type": "string", "enum": ["User", "Group"]}, "id": {"type": "string", "description": "SCIM id"},
                    "op": {"type": "string", "enum": ["created", "updated", "deleted", "archetype"]},
                    "snapshot": {"type": "object", "description": "The SCIM document after the change; absent for deletes"},
                    "members_added": {"type": "array", "items": {"type": "string"}},
                    "members_removed": {"type": "array", "items": {"type": "string"}},
                    "assignment": {"$ref": "#/components/schemas/AssignmentState"},
                    "deactivated": {"type": "boolean", "description": "Present (true) when this change turned an active user inactive"},
                    "reactivated": {"type": "boolean", "description": "Present (true) when this change turned an inactive user active again"},
                    "groups": {"type": "array", "items": {"type": "string"}, "description": "On a deactivation or reactivation: the user's direct groups then"},
                    "deleting_user": {"type": "boolean", "description": "Present (true) on a group change that removes a user being deleted (the deletion is the next change)"}}},
                "DeadLetter": {"type": "object", "required": ["id", "connector", "at", "reason", "event"], "properties": {
                    "id": {"type": "integer", "description": "What DELETE …/dead-letters/{id} and …/replay take"},
                    "connector": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
                    "reason": {"type": "string"},
                    "request": {"type": ["object", "null"], "properties": {"method": {"type": "string"}, "url": {"type": "string"}, "body": {"type": "string"}}},
                    "response": {"type": ["object", "null"], "properties": {"status": {"type": "integer"}, "body": {"type": "string"}}},
                    "event": {"$ref": "#/components/schemas/Change"}}},
                "DriftReport": {"type": "object", "properties": {
                    "connector": {"type": "string"}, "kind": {"type": "string"},
                    "checked": {"type": "integer"}, "drifted": {"type": "integer"},
                    "pending": {"type": "integer", "description": "Of the checked, those left to the change feed: a change to them waits for this connector (or was logged while the reconciliation ran) and sends them as they stand; none in a full run, so they are neither compared nor sent here"},
                    "found_at_target": {"type": "integer", "description": "Of the drifted, those the read-back found changed or soft-deleted at the target; each is sent again or counted in failed"}, "sent": {"type": "integer"},
                    "failed": {"type": "integer"}, "unmappable": {"type": "integer"},
                    "note": {"type": ["string", "null"]},
                    "read_back_stopped": {"type": ["string", "null"], "description": "Why reading users back from the target ended before the end of its window; the job then fails"},
                    "paused": {"type": ["string", "null"], "description": "Why re-sending stopped: the connector is paused (until when, and its last error); what was not sent counts in failed and the job fails at once instead of waiting the pause out"},
                    "not_loaded": {"type": ["string", "null"], "description": "Why nothing was checked: the connector is not loaded (its file does not load, or no file names it since the last stop; kind is then \"unknown\"), or its file loaded but it cannot start (a secret not set); its changes wait for it and the job fails, naming it. A connector disabled on purpose is listed with a note, and does not fail the job"},
                    "items": {"type": "array", "items": {"type": "object", "properties": {
                        "object": {"type": "string"}, "action": {"type": "string", "enum": ["put", "delete"]},
                        "reason": {"type": "string"}}}}}}
            }
        }
    });
    add_body_errors(&mut doc);
    add_uri_too_long(&mut doc);
    add_tenant_headers(&mut doc);
    doc
}

/// The longest request target hyper reads; it answers a longer one itself, with 414 and
/// no body, before any of our code runs (the limit is a constant in hyper, not a setting).
const MAX_URI_BYTES: usize = 65_534;

/// Every operation, whatever its parameters, can be sent a URI too long to read: told
/// here as it is answered, without the `Error` body.
fn add_uri_too_long(doc: &mut Value) {
    for_each_operation(doc, |op| {
        op["responses"]["414"] = json!({"description": format!(
            "The request URI (path and query) is over {MAX_URI_BYTES} bytes. Answered by the HTTP layer before the request is read: no body, not the Error schema"
        )});
    });
}

/// Call `f` on every operation of the document (not on a path's shared `parameters`).
fn for_each_operation(doc: &mut Value, mut f: impl FnMut(&mut Value)) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for (_, op) in item.iter_mut().filter(|(m, _)| m.as_str() != "parameters") {
            f(op);
        }
    }
}

/// The fields every user object carries (null when unknown), in the order shown.
const USER_FIELDS: [&str; 16] = [
    "user_id",
    "scim_id",
    "email",
    "first_name",
    "last_name",
    "job_title",
    "department",
    "manager_user_id",
    "archetype_id",
    "archetype_confidence",
    "archetype_assigned_by",
    "archetype_assigned_at",
    "is_active",
    "scim_external_id",
    "groups",
    "group_names",
];

/// The `error` codes, from the lists the errors are made from.
fn error_codes_description() -> String {
    let tokens: Vec<&str> = super::jwt::TOKEN_CODES.to_vec();
    format!(
        "Stable code, one of: {}; on 401, one of: {}",
        super::ERROR_CODES.join(", "),
        tokens.join(", ")
    )
}

/// Every operation that takes a body can be refused it: stalled (408), too large (413), or
/// labelled as something else than JSON or sent compressed (415).
fn add_body_errors(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            if op.get("requestBody").is_none() {
                continue;
            }
            op["responses"]["408"] =
                error_response("The body stalled for server.client_timeout_secs (request_timeout)");
            op["responses"]["413"] =
                error_response("The body is over server.max_body_bytes (payload_too_large)");
            op["responses"]["415"] = error_response(
                "The body is labelled with another Content-Type than JSON, or sent compressed (a Content-Encoding other than identity) (unsupported_media_type)",
            );
        }
    }
}

/// Every authenticated operation takes the optional tenant headers `authenticate`
/// checks; declared once as components and referenced from each operation.
fn add_tenant_headers(doc: &mut Value) {
    let header = |name: &str| {
        json!({"name": name, "in": "header", "required": false,
            "description": "When sent (every copy), must equal the token's tenant; otherwise 403 tenant_mismatch",
            "schema": {"type": "string"}})
    };
    doc["components"]["parameters"] = json!({
        "XTenant": header("X-Tenant"),
        "XClaresiaTenant": header("X-Claresia-Tenant"),
    });
    for_each_operation(doc, |op| {
        if op.get("security").is_some_and(|s| s == &json!([])) {
            return;
        }
        let refs = [
            json!({"$ref": "#/components/parameters/XTenant"}),
            json!({"$ref": "#/components/parameters/XClaresiaTenant"}),
        ];
        match op.get_mut("parameters").and_then(Value::as_array_mut) {
            Some(params) => params.extend(refs),
            None => op["parameters"] = Value::Array(refs.to_vec()),
        }
    });
}
