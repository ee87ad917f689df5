use crate::harness::*;
use serde_json::{Value, json};

fn member_ids(body: &Value) -> Vec<String> {
    let mut v: Vec<String> = body["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["value"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A group's displayName is unique in its tenant, in any letter case, as Entra and Okta
/// take it: a group create retried after a timeout made a second group of the name, which
/// their match by displayName then found twice, and which went downstream as a group.
#[tokio::test]
async fn group_display_name_is_unique_case_insensitively() {
    let d = TestDaemon::start().await;
    let group = |name: &str| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": name,
            "externalId": "ext-1",
        })
    };
    let finance = d.create_group("Finance").await;
    for name in ["Finance", "FINANCE", "finance"] {
        let r = d.post("/Groups", group(name)).await;
        assert_eq!(r.status, 409, "{name}: {}", r.body);
        assert_eq!(r.body["scimType"], "uniqueness", "{}", r.body);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains(&finance), "{detail}");
    }
    let found = d
        .get("/Groups?filter=displayName%20eq%20%22finance%22&excludedAttributes=members")
        .await;
    assert_eq!(found.body["totalResults"], 1, "{}", found.body);
    // Renamed onto it, by PATCH (Entra, Okta's path-less form) or PUT: refused, and
    // nothing changed.
    let sales = d.create_group("Sales").await;
    let path = format!("/Groups/{sales}");
    for ops in [
        json!([{"op": "Replace", "path": "displayName", "value": "finance"}]),
        json!([{"op": "replace", "value": {"id": sales, "displayName": "Finance"}}]),
    ] {
        let r = d.patch(&path, patch_op(ops.clone())).await;
        assert_eq!(r.status, 409, "{ops}: {}", r.body);
    }
    let r = d.put(&path, group("FINANCE")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(d.get(&path).await.body["displayName"], "Sales");
    // A group keeps its own name through a PUT, and may change its letter case.
    let r = d.put(&path, group("SALES")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = d.put(&path, group("SALES")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // In /Bulk, a second create of one name in one request is refused on its own.
    let bulk = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
        "Operations": [
            {"method": "POST", "path": "/Groups", "bulkId": "a", "data": group("Ops")},
            {"method": "POST", "path": "/Groups", "bulkId": "b", "data": group("ops")},
        ],
    });
    let r = d.post("/Bulk", bulk).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["Operations"][0]["status"], "201", "{}", r.body);
    assert_eq!(r.body["Operations"][1]["status"], "409", "{}", r.body);
    // Deleted, its name is free again; /Schemas says the name is unique.
    assert_eq!(d.delete(&format!("/Groups/{finance}")).await.status, 204);
    d.create_group("finance").await;
    let schema = d
        .get("/Schemas/urn:ietf:params:scim:schemas:core:2.0:Group")
        .await;
    assert_eq!(
        schema.body["attributes"][0]["name"], "displayName",
        "{}",
        schema.body
    );
    assert_eq!(schema.body["attributes"][0]["uniqueness"], "server");
}

#[tokio::test]
async fn group_membership_add_remove_replace() {
    let d = TestDaemon::start().await;
    let a = d.create_user("a@example.com").await;
    let b = d.create_user("b@example.com").await;
    let c = d.create_user("c@example.com").await;
    let r = d
        .post(
            "/Groups",
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                "displayName": "Engineering",
                "members": [{"value": a, "type": "User"}],
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let gid = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(member_ids(&r.body), vec![a.clone()]);
    let path = format!("/Groups/{gid}");

    // Adding merges without duplicates. A group PATCH answers 204 with the new ETag,
    // not the whole member list (RFC 7644 §3.5.2)...
    let before = d.get(&path).await.header("etag").unwrap().to_owned();
    let r = d
        .patch(
            &path,
            patch_op(
                json!([{"op": "Add", "path": "members", "value": [{"value": a}, {"value": b}]}]),
            ),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(r.body, Value::Null);
    let etag = r.header("etag").unwrap().to_owned();
    assert_ne!(etag, before);
    let g = d.get(&path).await;
    assert_eq!(g.header("etag"), Some(etag.as_str()));
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(member_ids(&g.body), want);
    // ...unless the client asks for it.
    let path = format!("{path}?attributes=members");

    // Entra's newer removal form.
    let r = d
        .patch(
            &path,
            patch_op(json!([{"op": "remove", "path": format!("members[value eq \"{a}\"]")}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(member_ids(&r.body), vec![b.clone()]);

    // Entra's older removal form.
    let r = d
        .patch(
            &path,
            patch_op(json!([{"op": "Remove", "path": "members", "value": [{"value": b}]}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(member_ids(&r.body).is_empty());

    // Replace with a whole list, then PUT with another.
    let r = d
        .patch(
            &path,
            patch_op(json!([{"op": "replace", "path": "members", "value": [{"value": a}, {"value": c}]}])),
        )
        .await;
    let mut want = vec![a.clone(), c.clone()];
    want.sort();
    assert_eq!(member_ids(&r.body), want);
    let path = format!("/Groups/{gid}");
    let r = d
        .put(
            &path,
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Eng", "members": [{"value": c}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["displayName"], "Eng");
    assert_eq!(member_ids(&r.body), vec![c.clone()]);

    // The user sees its group; deleting the user removes the membership.
    let u = d.get(&format!("/Users/{c}")).await;
    assert_eq!(u.body["groups"][0]["value"], gid.as_str());
    assert_eq!(u.body["groups"][0]["display"], "Eng");
    assert_eq!(d.delete(&format!("/Users/{c}")).await.status, 204);
    let g = d.get(&path).await;
    assert!(member_ids(&g.body).is_empty(), "{}", g.body);
}

#[tokio::test]
async fn members_must_exist_and_failed_patch_changes_nothing() {
    let d = TestDaemon::start().await;
    let a = d.create_user("exists@example.com").await;
    let gid = d.create_group("G").await;
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([
                {"op": "add", "path": "members", "value": [{"value": a}]},
                {"op": "add", "path": "members", "value": [{"value": "00000000-0000-0000-0000-000000000000"}]},
            ])),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "invalidValue");
    let g = d.get(&format!("/Groups/{gid}")).await;
    assert!(
        member_ids(&g.body).is_empty(),
        "nothing half-applied: {}",
        g.body
    );
}

#[tokio::test]
async fn excluded_members_and_group_filters() {
    let d = TestDaemon::start().await;
    let a = d.create_user("m@example.com").await;
    let gid = d.create_group("Sales Team").await;
    d.patch(
        &format!("/Groups/{gid}"),
        patch_op(json!([{"op": "add", "path": "members", "value": [{"value": a}]}])),
    )
    .await;
    let r = d
        .get("/Groups?filter=displayName%20eq%20%22sales%20team%22&excludedAttributes=members")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totalResults"], 1);
    assert!(r.body["Resources"][0].get("members").is_none());
    let r = d
        .get(&format!(
            "/Groups?filter=members%5Bvalue%20eq%20%22{a}%22%5D"
        ))
        .await;
    assert_eq!(r.body["totalResults"], 1, "{}", r.body);
    let r = d
        .get(&format!("/Groups/{gid}?excludedAttributes=members"))
        .await;
    assert!(r.body.get("members").is_none());
    assert_eq!(r.body["displayName"], "Sales Team");
}

/// POST and PUT answer as `attributes` and `excludedAttributes` ask (RFC 7644 §3.9), as
/// GET and PATCH do: a group PUT echoed every member whatever was asked. A bad list is
/// refused before the write.
#[tokio::test]
async fn post_and_put_answer_with_the_attributes_asked_for() {
    let d = TestDaemon::start().await;
    let user = |name: &str| {
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
               "userName": name, "title": "Engineer", "nickName": "n"})
    };
    let r = d
        .post("/Users?attributes=userName", user("r1@example.com"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["userName"], "r1@example.com", "{}", r.body);
    assert!(r.body["id"].is_string(), "{}", r.body);
    assert!(
        r.body.get("title").is_none() && r.body.get("meta").is_none(),
        "{}",
        r.body
    );
    let a = r.body["id"].as_str().unwrap().to_owned();
    let r = d
        .put(
            &format!("/Users/{a}?excludedAttributes=title"),
            user("r1@example.com"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.get("title").is_none(), "{}", r.body);
    assert_eq!(r.body["nickName"], "n", "{}", r.body);
    let gid = d.create_group("Echo").await;
    let group = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                       "displayName": "Echo", "members": [{"value": a}]});
    let r = d
        .put(
            &format!("/Groups/{gid}?excludedAttributes=members"),
            group.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.get("members").is_none(), "{}", r.body);
    assert_eq!(r.body["displayName"], "Echo", "{}", r.body);
    let r = d.put(&format!("/Groups/{gid}"), group).await;
    assert_eq!(r.body["members"][0]["value"], a.as_str(), "{}", r.body);
    // The core schema's URN names the members too, which are stored apart.
    let r = d
        .get(&format!(
            "/Groups/{gid}?attributes=urn:ietf:params:scim:schemas:core:2.0:Group"
        ))
        .await;
    assert_eq!(r.body["members"][0]["value"], a.as_str(), "{}", r.body);
    assert_eq!(r.body["displayName"], "Echo", "{}", r.body);
    let r = d
        .post("/Users?attributes=abc%C3%A9", user("never@example.com"))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = d
        .get("/Users?filter=userName%20eq%20%22never@example.com%22")
        .await;
    assert_eq!(r.body["totalResults"], 0, "{}", r.body);
}

/// A filtered `replace` of members that selects none is 400 `noTarget` (RFC 7644
/// §3.5.2.3), as one of emails is: it added the member, which no one asked for.
#[tokio::test]
async fn a_filtered_member_replace_that_selects_nobody_is_no_target() {
    let d = TestDaemon::start().await;
    let a = d.create_user("a@example.com").await;
    let b = d.create_user("b@example.com").await;
    let gid = d.create_group("Swap").await;
    let replace = |which: &str, with: &str| {
        patch_op(
            json!([{"op": "replace", "path": format!("members[value eq \"{which}\"]"),
                          "value": [{"value": with}]}]),
        )
    };
    let r = d.patch(&format!("/Groups/{gid}"), replace(&a, &b)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "noTarget", "{}", r.body);
    let g = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(g.body["members"], json!([]), "{}", g.body);
    d.patch(
        &format!("/Groups/{gid}"),
        patch_op(json!([{"op": "add", "path": "members", "value": [{"value": a}]}])),
    )
    .await;
    let r = d.patch(&format!("/Groups/{gid}"), replace(&a, &b)).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let g = d.get(&format!("/Groups/{gid}")).await;
    let ids: Vec<&str> = g.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b.as_str()], "{}", g.body);
}

#[tokio::test]
async fn large_member_patch_is_applied_whole() {
    let d = TestDaemon::start().await;
    let gid = d.create_group("Big").await;
    // Users created through /Bulk to keep the test quick.
    let r = d
        .bulk(user_posts(0..1000, |i| format!("big{i}@example.com")))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<String> = r.body["Operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert_eq!(o["status"], "201", "{o}");
            location_id(o)
        })
        .collect();
    let members: Vec<Value> = ids.iter().map(|i| json!({"value": i})).collect();
    let r = d
        .patch(
            &format!("/Groups/{gid}?excludedAttributes=members"),
            patch_op(json!([{"op": "add", "path": "members", "value": members}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body.get("members"), None, "{}", r.body);
    let g = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(g.body["members"].as_array().unwrap().len(), 1000);
    // Remove half in one request.
    let half: Vec<Value> = ids[..500].iter().map(|i| json!({"value": i})).collect();
    let r = d
        .patch(
            &format!("/Groups/{gid}?attributes=members"),
            patch_op(json!([{"op": "remove", "path": "members", "value": half}])),
        )
        .await;
    assert_eq!(r.body["members"].as_array().unwrap().len(), 500);
}
