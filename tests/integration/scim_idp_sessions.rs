//! Provisioning sessions replayed the way Entra ID and Okta send them
//! (see shared/reference/idp-quirks.md).
use crate::harness::*;
use serde_json::json;

#[tokio::test]
async fn entra_style_session() {
    let d = TestDaemon::start().await;
    // Test connection: random user and group reads; probes answer empty lists and 404s.
    let r = d
        .get("/Users?filter=userName%20eq%20%22f5b1a0b0-0000-4000-8000-000000000000%22")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["totalResults"], 0);
    assert_eq!(r.body["Resources"].as_array().map(Vec::len), Some(0));
    let r = d.get("/Users/f5b1a0b0-0000-4000-8000-000000000000").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:Error"
    );

    // Create as Entra sends it: extra read-only meta, empty roles, enterprise extension.
    let r = d
        .post(
            "/Users",
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
                "externalId": "8aa1a0c0-c4c3-4bc0-b7e1-ffe2b5b0c3f2",
                "userName": "Test_User_ab6490ee@contoso.com",
                "active": true,
                "displayName": "Test User",
                "meta": {"resourceType": "User"},
                "roles": [],
                "emails": [{"primary": true, "type": "work", "value": "Test_User_ab6490ee@contoso.com"}],
                "name": {"formatted": "Test User", "familyName": "User", "givenName": "Test"},
                ENTERPRISE: {"employeeNumber": "1234", "department": "Finance"},
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let p = format!("/Users/{id}");

    // Matching probe by userName, different case.
    let r = d
        .get("/Users?filter=userName%20eq%20%22test_user_ab6490ee%40contoso.com%22")
        .await;
    assert_eq!(r.body["totalResults"], 1);
    // Matching by externalId and by work email.
    let r = d
        .get("/Users?filter=externalId%20eq%20%228aa1a0c0-c4c3-4bc0-b7e1-ffe2b5b0c3f2%22")
        .await;
    assert_eq!(r.body["totalResults"], 1);
    let r = d
        .get("/Users?filter=emails%5Btype%20eq%20%22work%22%5D.value%20eq%20%22Test_User_ab6490ee%40contoso.com%22")
        .await;
    // `emails[...].value eq` is outside RFC 7644's filter grammar, but Entra matches with
    // it, so it finds the user.
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totalResults"], 1, "{}", r.body);

    // Newer dialect: path-less replace with dotted and URN keys.
    let r = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "value": {
                "displayName": "Updated",
                "name.givenName": "Upd",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "5678",
            }}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["displayName"], "Updated");
    assert_eq!(r.body["name"]["givenName"], "Upd");
    assert_eq!(r.body["name"]["familyName"], "User");
    assert_eq!(r.body[ENTERPRISE]["employeeNumber"], "5678");
    assert_eq!(r.body[ENTERPRISE]["department"], "Finance");

    // Older dialect: capitalized ops, "False" strings, Add on a single-valued attribute,
    // filtered path that must create its element, manager as a bare string.
    let r = d
        .patch(
            &p,
            patch_op(json!([
                {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "new@contoso.com"},
                {"op": "Add", "path": "phoneNumbers[type eq \"mobile\"].value", "value": "+1 555 0100"},
                {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager", "value": "mgr-1"},
                {"op": "Replace", "path": "active", "value": "False"},
            ])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["active"], false, "string booleans coerced");
    assert_eq!(r.body["emails"][0]["value"], "new@contoso.com");
    assert_eq!(r.body["phoneNumbers"][0]["type"], "mobile");
    assert_eq!(r.body["phoneNumbers"][0]["value"], "+1 555 0100");
    assert_eq!(r.body[ENTERPRISE]["manager"]["value"], "mgr-1");
    // The new email is indexed, the old one is not.
    let r = d
        .get("/Users?filter=emails.value%20eq%20%22new%40contoso.com%22")
        .await;
    assert_eq!(r.body["totalResults"], 1);
    let r = d
        .get("/Users?filter=emails.value%20eq%20%22Test_User_ab6490ee%40contoso.com%22")
        .await;
    assert_eq!(r.body["totalResults"], 0);

    // Soft-deleted users stay readable.
    let g = d.get(&p).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body["active"], false);

    // Groups: created empty (with an extra Microsoft schema), filled by PATCH, emptied.
    let r = d
        .post(
            "/Groups",
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group", "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"],
                "externalId": "grp-ext-1",
                "displayName": "Group_1",
                "meta": {"resourceType": "Group"},
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let gid = r.body["id"].as_str().unwrap().to_owned();
    let r = d
        .get("/Groups?filter=displayName%20eq%20%22Group_1%22&excludedAttributes=members")
        .await;
    assert_eq!(r.body["totalResults"], 1);
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "Add", "path": "members", "value": [{"value": id}]}])),
        )
        .await;
    assert!(r.status == 200 || r.status == 204, "{}", r.body);
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "Replace", "path": "displayName", "value": "Group_1_renamed"}])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(r.body["displayName"], "Group_1_renamed");
    assert_eq!(
        r.body["members"][0]["value"],
        id.as_str(),
        "rename keeps members"
    );
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "Remove", "path": "members", "value": [{"value": id}]}])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Emptied, it says so (`[]`), as a group's answer always carries its members.
    let r = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(r.body["members"], json!([]), "{}", r.body);

    // Hard delete, much later.
    assert_eq!(d.delete(&p).await.status, 204);
    assert_eq!(d.delete(&format!("/Groups/{gid}")).await.status, 204);
    assert_eq!(d.get(&p).await.status, 404);
}

#[tokio::test]
async fn okta_style_session() {
    let d = TestDaemon::start().await;
    // Probe before create, with Okta's paging parameters.
    let r = d
        .get("/Users?filter=userName%20eq%20%22isaac.brock%40example.com%22&startIndex=1&count=100")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["totalResults"], 0);
    // Create with password, groups: [], locale; application/json content type.
    let body = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "isaac.brock@example.com",
        "name": {"givenName": "Isaac", "familyName": "Brock"},
        "emails": [{"primary": true, "value": "isaac.brock@example.com", "type": "work"}],
        "displayName": "Isaac Brock",
        "locale": "en-US",
        "externalId": "00ujl29u0le5T6Aj10h7",
        "groups": [],
        "password": "1mz050nq",
        "active": true,
    });
    let r = d
        .raw(
            reqwest::Method::POST,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[("content-type", "application/json")],
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(r.body.get("password").is_none());
    let p = format!("/Users/{id}");

    // A second create of the same user is a 409 with a SCIM body.
    let r = d.post("/Users", body.clone()).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["scimType"], "uniqueness");

    // Update: GET then full PUT of the resource (id, meta, groups included).
    let mut full = d.get(&p).await.body;
    full["name"]["givenName"] = json!("Ike");
    full["groups"] = json!([]);
    let r = d.put(&p, full).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["name"]["givenName"], "Ike");
    assert_eq!(r.body["id"], id.as_str());

    // Deactivation: path-less replace.
    let r = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "value": {"active": false}}])),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["active"], false);

    // Groups: create, rename with id in the value (dropped), membership remove + add,
    // then replace with the whole list.
    let other = d.create_user("other@example.com").await;
    let gid = d.create_group("Okta Group").await;
    let gp = format!("/Groups/{gid}");
    let r = d
        .patch(
            &gp,
            patch_op(
                json!([{"op": "replace", "value": {"id": gid, "displayName": "Okta Group 2"}}]),
            ),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = d.get(&gp).await;
    assert_eq!(r.body["displayName"], "Okta Group 2");
    assert_eq!(r.body["id"], gid.as_str());
    let r = d
        .patch(
            &gp,
            patch_op(json!([
                {"op": "add", "path": "members", "value": [{"value": id, "display": "isaac.brock@example.com"}]},
            ])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = d.get(&gp).await;
    assert_eq!(r.body["members"].as_array().unwrap().len(), 1);
    let r = d
        .patch(
            &gp,
            patch_op(json!([
                {"op": "remove", "path": format!("members[value eq \"{id}\"]")},
                {"op": "add", "path": "members", "value": [{"value": other}]},
            ])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = d.get(&gp).await;
    assert_eq!(r.body["members"][0]["value"], other.as_str());
    assert_eq!(r.body["members"].as_array().unwrap().len(), 1);
    let r = d
        .patch(
            &gp,
            patch_op(json!([{"op": "replace", "path": "members", "value": [{"value": id}, {"value": other}]}])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = d.get(&gp).await;
    assert_eq!(r.body["members"].as_array().unwrap().len(), 2);
    // Paging the way Okta does.
    let r = d.get("/Users?startIndex=1&count=100").await;
    assert_eq!(r.body["totalResults"], 2);
    assert_eq!(r.body["itemsPerPage"], 2);
}
