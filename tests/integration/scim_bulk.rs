use crate::harness::*;
use serde_json::json;

const BULK: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";

/// Each result's `status`, in the response's order.
fn status_list(body: &serde_json::Value) -> Vec<&str> {
    body["Operations"]
        .as_array()
        .expect("Operations")
        .iter()
        .map(|o| o["status"].as_str().expect("status"))
        .collect()
}

#[tokio::test]
async fn bulk_ids_link_operations() {
    let d = TestDaemon::start().await;
    let r = d
        .post(
            "/Bulk",
            json!({
                "schemas": [BULK],
                "Operations": [
                    {"method": "POST", "path": "/Users", "bulkId": "u1", "data": user("bulk1@example.com")},
                    {"method": "POST", "path": "/Groups", "bulkId": "g1", "data": {
                        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                        "displayName": "Bulk Group",
                        "members": [{"value": "bulkId:u1", "type": "User"}]}},
                    {"method": "PATCH", "path": "/Users/bulkId:u1", "data": patch_op(json!([
                        {"op": "replace", "path": "displayName", "value": "Bulky"}]))},
                ],
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
    );
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(ops.len(), 3);
    assert_eq!(ops[0]["status"], "201");
    assert_eq!(ops[1]["status"], "201", "{}", ops[1]);
    assert_eq!(ops[2]["status"], "200", "{}", ops[2]);
    let uid = location_id(&ops[0]);
    let gid = location_id(&ops[1]);
    let g = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(g.body["members"][0]["value"], uid);
    let u = d.get(&format!("/Users/{uid}")).await;
    assert_eq!(u.body["displayName"], "Bulky");

    // A reference inside a PATCH path's filter is resolved too: the remove takes the
    // member out instead of matching no one; an unknown one fails that operation.
    let r = d
        .bulk(json!([
            {"method": "POST", "path": "/Users", "bulkId": "u2", "data": user("bulk2@example.com")},
            {"method": "PATCH", "path": format!("/Groups/{gid}"), "data": patch_op(json!([
                {"op": "add", "path": "members", "value": [{"value": "bulkId:u2"}]}]))},
            {"method": "PATCH", "path": format!("/Groups/{gid}"), "data": patch_op(json!([
                {"op": "remove", "path": "members[value eq \"bulkId:u2\"]"}]))},
            {"method": "PATCH", "path": format!("/Groups/{gid}"), "data": patch_op(json!([
                {"op": "remove", "path": "members[value eq \"bulkId:nope\"]"}]))},
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["201", "204", "204", "400"], "{}", r.body);
    let g = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(g.body["members"].as_array().unwrap().len(), 1, "{}", g.body);
    assert_eq!(g.body["members"][0]["value"], uid);
}

/// RFC 7644 §3.7.1: a reference to a resource a later POST creates waits for it; a circle
/// of references is refused with 409 while the rest of the request runs.
#[tokio::test]
async fn bulk_resolves_forward_references_and_refuses_circles() {
    let d = TestDaemon::start().await;
    let group = |name: &str, member: &str| {
        json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": name,
        "members": [{"value": format!("bulkId:{member}")}]})
    };
    let r = d
        .bulk(json!([
            {"method": "POST", "path": "/Groups", "bulkId": "g", "data": group("Forward", "u")},
            {"method": "POST", "path": "/Users", "bulkId": "u", "data": user("fwd1@example.com")},
            {"method": "PATCH", "path": "/Users/bulkId:u2", "data": patch_op(json!([
                {"op": "replace", "path": "displayName", "value": "Later"}]))},
            {"method": "POST", "path": "/Users", "bulkId": "u2", "data": user("fwd2@example.com")},
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ops = r.body["Operations"].as_array().unwrap();
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["201", "201", "200", "201"], "{}", r.body);
    let ids: Vec<&str> = ops
        .iter()
        .map(|o| o["bulkId"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, ["g", "u", "", "u2"], "results stay in request order");
    let id_of = |i: usize| location_id(&ops[i]);
    let g = d.get(&format!("/Groups/{}", id_of(0))).await;
    assert_eq!(g.body["members"][0]["value"], id_of(1), "{}", g.body);
    let u2 = d.get(&format!("/Users/{}", id_of(3))).await;
    assert_eq!(u2.body["displayName"], "Later", "{}", u2.body);

    let r = d
        .bulk(json!([
            {"method": "POST", "path": "/Groups", "bulkId": "c1", "data": group("C1", "c2")},
            {"method": "POST", "path": "/Groups", "bulkId": "c2", "data": group("C2", "c1")},
            {"method": "POST", "path": "/Users", "bulkId": "x", "data": user("fwd3@example.com")},
        ]))
        .await;
    let ops = r.body["Operations"].as_array().unwrap();
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["409", "409", "201"], "{}", r.body);
    assert!(
        ops[0]["response"]["detail"]
            .as_str()
            .unwrap()
            .contains("wait for each other")
    );
    let groups = d.get("/Groups").await;
    assert_eq!(
        groups.body["totalResults"], 1,
        "only Forward: {}",
        groups.body
    );

    // A circle fails at its place in the request, so failOnErrors stops there as it
    // does for any other failure: the POST after it never runs.
    let r = d
        .post(
            "/Bulk",
            json!({"schemas": [BULK], "failOnErrors": 1, "Operations": [
                {"method": "POST", "path": "/Groups", "bulkId": "d1", "data": group("D1", "d2")},
                {"method": "POST", "path": "/Groups", "bulkId": "d2", "data": group("D2", "d1")},
                {"method": "POST", "path": "/Users", "bulkId": "y", "data": user("fwd4@example.com")},
            ]}),
        )
        .await;
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["409"], "{}", r.body);
    let y = d
        .get("/Users?filter=userName%20eq%20%22fwd4@example.com%22")
        .await;
    assert_eq!(y.body["totalResults"], 0, "{}", y.body);
}

/// An operation that waits for a later POST holds back the later operations on the same
/// resource: the request's last write to a resource is the one that stands, wherever the
/// bulkIds sit in it.
#[tokio::test]
async fn bulk_keeps_the_request_order_for_each_resource() {
    let d = TestDaemon::start().await;
    let title = |t: &str| patch_op(json!([{"op": "replace", "path": "title", "value": t}]));
    let r = d
        .bulk(json!([
            {"method": "PATCH", "path": "/Users/bulkId:t", "data": title("first")},
            {"method": "POST", "path": "/Users", "bulkId": "t", "data": user("order1@example.com")},
            {"method": "PATCH", "path": "/Users/bulkId:t", "data": title("second")},
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ops = r.body["Operations"].as_array().unwrap();
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["200", "201", "200"], "{}", r.body);
    let u = d.get(&format!("/Users/{}", location_id(&ops[1]))).await;
    assert_eq!(u.body["title"], "second", "{}", u.body);
    let version = |o: &serde_json::Value| {
        o["version"]
            .as_str()
            .unwrap()
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse::<u64>()
            .unwrap()
    };
    assert!(version(&ops[2]) > version(&ops[0]), "{}", r.body);

    // failOnErrors stops the request at its error, but what came before the error and
    // waited for a POST that ran still runs, in order; what came after it does not.
    let r = d
        .post(
            "/Bulk",
            json!({"schemas": [BULK], "failOnErrors": 1, "Operations": [
                {"method": "PATCH", "path": "/Users/bulkId:s", "data": title("first")},
                {"method": "POST", "path": "/Users", "bulkId": "s", "data": user("order3@example.com")},
                {"method": "PATCH", "path": "/Users/bulkId:s", "data": title("second")},
                {"method": "DELETE", "path": "/Users/does-not-exist"},
                {"method": "POST", "path": "/Users", "bulkId": "after", "data": user("order4@example.com")},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ops = r.body["Operations"].as_array().unwrap();
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["200", "201", "200", "404"], "{}", r.body);
    let u = d.get(&format!("/Users/{}", location_id(&ops[1]))).await;
    assert_eq!(u.body["title"], "second", "{}", u.body);
    let after = d
        .get("/Users?filter=userName%20eq%20%22order4@example.com%22")
        .await;
    assert_eq!(after.body["totalResults"], 0, "{}", after.body);

    // A member added ahead of its group's POST and removed by the request's last
    // operation stays out.
    let r = d
        .bulk(json!([
            {"method": "PATCH", "path": "/Groups/bulkId:g", "data": patch_op(json!([
                {"op": "add", "path": "members", "value": [{"value": "bulkId:u"}]}]))},
            {"method": "POST", "path": "/Groups", "bulkId": "g", "data": {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Order"}},
            {"method": "POST", "path": "/Users", "bulkId": "u", "data": user("order2@example.com")},
            {"method": "PATCH", "path": "/Groups/bulkId:g", "data": patch_op(json!([
                {"op": "remove", "path": "members[value eq \"bulkId:u\"]"}]))},
        ]))
        .await;
    let ops = r.body["Operations"].as_array().unwrap();
    let statuses = status_list(&r.body);
    assert_eq!(statuses, ["204", "201", "201", "204"], "{}", r.body);
    let g = d.get(&format!("/Groups/{}", location_id(&ops[1]))).await;
    assert_eq!(
        g.body
            .get("members")
            .map_or(0, |m| m.as_array().unwrap().len()),
        0,
        "{}",
        g.body
    );
}

/// RFC 7644 §3.7: a `version` is the operation's If-Match (`*` included), a failed PUT,
/// PATCH or DELETE still says which resource it was about, and a POST's path is an
/// endpoint.
#[tokio::test]
async fn bulk_versions_locations_and_paths() {
    let d = TestDaemon::start().await;
    let id = d.create_user("ver@example.com").await;
    let path = format!("/Users/{id}");
    let nick = |n: &str| patch_op(json!([{"op": "replace", "path": "nickName", "value": n}]));
    let r = d
        .bulk(json!([
            {"method": "PATCH", "path": path, "version": "*", "data": nick("any")},
            {"method": "PATCH", "path": path, "version": "W/\"1\"", "data": nick("stale")},
            {"method": "PATCH", "path": path, "version": 5, "data": nick("number")},
            {"method": "DELETE", "path": "/Users/does-not-exist"},
            {"method": "POST", "path": format!("/Users/{id}"), "bulkId": "p", "data": user("ver2@example.com")},
            {"method": "POST", "path": "/Groups/../Users", "bulkId": "q", "data": user("ver3@example.com")},
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ops = r.body["Operations"].as_array().unwrap();
    let statuses = status_list(&r.body);
    assert_eq!(
        statuses,
        ["200", "412", "400", "404", "400", "400"],
        "{}",
        r.body
    );
    assert!(
        ops[2]["response"]["detail"]
            .as_str()
            .unwrap()
            .contains("version must be a string"),
        "{}",
        ops[2]
    );
    assert!(
        ops[4]["response"]["detail"]
            .as_str()
            .unwrap()
            .contains("without an id"),
        "{}",
        ops[4]
    );
    let here = d.scim_url(&path);
    for i in [0, 1, 2] {
        assert_eq!(ops[i]["location"], here.as_str(), "{}", ops[i]);
    }
    assert_eq!(
        ops[3]["location"],
        d.scim_url("/Users/does-not-exist").as_str(),
        "{}",
        ops[3]
    );
    assert!(
        ops[4].get("location").is_none(),
        "a failed POST has none: {}",
        ops[4]
    );
    let u = d.get(&path).await;
    assert_eq!(u.body["nickName"], "any", "{}", u.body);
    let all = d.get("/Users").await;
    assert_eq!(
        all.body["totalResults"], 1,
        "the POSTs created nothing: {}",
        all.body
    );
    let r = d
        .bulk(json!([
            {"method": "DELETE", "path": path},
            {"method": "DELETE", "path": "/Users/../../other/Users/x"},
        ]))
        .await;
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(ops[0]["status"], "204", "{}", r.body);
    assert_eq!(ops[0]["location"], here.as_str(), "{}", r.body);
    assert_eq!(ops[1]["status"], "404", "{}", r.body);
    assert!(ops[1].get("location").is_none(), "no URI: {}", r.body);
}

#[tokio::test]
async fn bulk_fail_on_errors_stops_early() {
    let d = TestDaemon::start().await;
    d.create_user("dup@example.com").await;
    let r = d
        .post(
            "/Bulk",
            json!({
                "schemas": [BULK],
                "failOnErrors": 1,
                "Operations": [
                    {"method": "POST", "path": "/Users", "bulkId": "a", "data": user("dup@example.com")},
                    {"method": "POST", "path": "/Users", "bulkId": "b", "data": user("fresh@example.com")},
                ],
            }),
        )
        .await;
    assert_eq!(r.status, 200);
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(ops.len(), 1, "stopped after the first error: {}", r.body);
    assert_eq!(ops[0]["status"], "409");
    assert_eq!(ops[0]["response"]["scimType"], "uniqueness");
    let l = d
        .get("/Users?filter=userName%20eq%20%22fresh@example.com%22")
        .await;
    assert_eq!(l.body["totalResults"], 0);

    // Without failOnErrors every operation runs.
    let r = d
        .post(
            "/Bulk",
            json!({"schemas": [BULK], "Operations": [
                {"method": "POST", "path": "/Users", "bulkId": "a", "data": user("dup@example.com")},
                {"method": "POST", "path": "/Users", "bulkId": "b", "data": user("fresh@example.com")},
                {"method": "DELETE", "path": "/Users/does-not-exist"},
                {"method": "POST", "path": "/Groups", "bulkId": "g", "data": {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "G", "members": [{"value": "bulkId:nope"}]}},
            ]}),
        )
        .await;
    let statuses: Vec<&str> = r.body["Operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["409", "201", "404", "400"]);
}

#[tokio::test]
async fn bulk_over_the_operation_limit_is_413() {
    let d = TestDaemon::start_with(Options {
        scim: rosterd::config::ScimConfig {
            bulk_max_operations: 2,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let ops: Vec<_> = (0..3)
        .map(|i| json!({"method": "POST", "path": "/Users", "bulkId": format!("b{i}"), "data": user(&format!("l{i}@x.test"))}))
        .collect();
    let r = d
        .post("/Bulk", json!({"schemas": [BULK], "Operations": ops}))
        .await;
    assert_eq!(r.status, 413, "{}", r.body);
    let l = d.get("/Users?count=0").await;
    assert_eq!(l.body["totalResults"], 0, "nothing applied");
}

/// An operation's keys are read in any letter case: a stale `"Version"` was read as no
/// precondition, and the PATCH and DELETE it guarded went through. A `version` may list
/// ETags, as `If-Match` does. A key given twice in two cases, or a bulkId no reference
/// can name (empty, or holding a quote), is refused whole.
#[tokio::test]
async fn bulk_operation_keys_in_any_case_and_etag_lists() {
    let d = TestDaemon::start().await;
    let id = d.create_user("keys@example.com").await;
    let path = format!("/Users/{id}");
    let etag = d.get(&path).await.body["meta"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let nick = |n: &str| patch_op(json!([{"op": "replace", "path": "nickName", "value": n}]));
    let r = d
        .bulk(json!([
            {"Method": "PATCH", "Path": path, "Version": "W/\"999\"", "Data": nick("stale")},
            {"METHOD": "DELETE", "PATH": path, "VERSION": "W/\"999\""},
            {"method": "PATCH", "path": path, "version": format!("W/\"999\", {etag}"), "data": nick("listed")},
            {"Method": "POST", "Path": "/Users", "BulkId": "n", "Data": user("keys2@example.com"),
             "location": null, "status": null},
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        status_list(&r.body),
        ["412", "412", "200", "201"],
        "{}",
        r.body
    );
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(
        (&ops[0]["method"], &ops[3]["bulkId"]),
        (&json!("PATCH"), &json!("n"))
    );
    let u = d.get(&path).await;
    assert_eq!(u.status, 200, "{}", u.body);
    assert_eq!(u.body["nickName"], "listed", "{}", u.body);

    for (ops, says) in [
        (
            json!([{"method": "DELETE", "path": path, "version": "*", "Version": "W/\"1\""}]),
            "version is given twice",
        ),
        (
            json!([{"method": "DELETE", "path": path, "verison": "W/\"1\""}]),
            "\"verison\" is not a key of a bulk operation",
        ),
        (
            json!({"schemas": [BULK], "failOnError": 1, "Operations": [
                {"method": "DELETE", "path": path}]}),
            "\"failOnError\" is not a key of a BulkRequest",
        ),
        (
            json!([{"method": "POST", "path": "/Users", "bulkId": "", "data": user("e@x.test")}]),
            "holds no double quote",
        ),
        (
            json!([{"method": "POST", "path": "/Users", "bulkId": "a\"b", "data": user("q@x.test")}]),
            "holds no double quote",
        ),
    ] {
        // A whole request, or its operations.
        let r = if ops.is_object() {
            d.post("/Bulk", ops).await
        } else {
            d.bulk(ops).await
        };
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(says),
            "{}",
            r.body
        );
    }
    assert_eq!(d.get(&path).await.status, 200, "nothing ran");
    assert_eq!(d.get("/Users").await.body["totalResults"], 2);
}

/// failOnErrors stops the request at the first error in the order operations run: an
/// operation waiting for a later POST runs right after it, so when it fails, the
/// independent POSTs after it in the request do not run. They ran first, and a DELETE
/// held behind the failed operation vanished from the response while later operations
/// ran. A group naming its own bulkId waits in a circle of one: 409.
#[tokio::test]
async fn bulk_fail_on_errors_counts_in_the_order_operations_run() {
    let d = TestDaemon::start().await;
    let missing = uuid::Uuid::new_v4();
    let manager = patch_op(json!([{"op": "replace",
        "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
        "value": {"value": "bulkId:t"}}]));
    let r = d
        .post(
            "/Bulk",
            json!({"schemas": [BULK], "failOnErrors": 1, "Operations": [
                {"method": "PATCH", "path": format!("/Users/{missing}"), "data": manager},
                {"method": "POST", "path": "/Users", "bulkId": "t", "data": user("ft@example.com")},
                {"method": "POST", "path": "/Users", "bulkId": "u", "data": user("fu@example.com")},
                {"method": "DELETE", "path": format!("/Users/{missing}")},
                {"method": "POST", "path": "/Users", "bulkId": "v", "data": user("fv@example.com")},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(status_list(&r.body), ["404", "201"], "{}", r.body);
    let names: Vec<String> = d.get("/Users").await.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userName"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["ft@example.com"], "u and v were not created");

    let r = d
        .bulk(json!([
            {"method": "POST", "path": "/Groups", "bulkId": "s", "data": {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                "displayName": "Itself", "members": [{"value": "bulkId:s"}]}},
        ]))
        .await;
    assert_eq!(status_list(&r.body), ["409"], "{}", r.body);
    assert!(
        r.body["Operations"][0]["response"]["detail"]
            .as_str()
            .unwrap()
            .contains("its own"),
        "{}",
        r.body
    );
}
