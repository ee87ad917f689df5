use crate::harness::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn create_get_replace_delete_user() {
    let d = TestDaemon::start().await;
    let mut body = user("Alice@Example.com");
    body[ENTERPRISE] = json!({"department": "Sales", "employeeNumber": "701"});
    body["schemas"] = json!(["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE]);
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/scim+json"),
        "SCIM media type"
    );
    let id = r.body["id"].as_str().unwrap().to_owned();
    let loc = r.header("location").unwrap().to_owned();
    assert!(
        loc.ends_with(&format!("/scim/v2/{TENANT}/Users/{id}")),
        "{loc}"
    );
    assert_eq!(r.body["meta"]["resourceType"], "User");
    assert_eq!(r.body["meta"]["location"], loc);
    assert_eq!(r.body["userName"], "Alice@Example.com", "stored as sent");
    assert_eq!(r.body[ENTERPRISE]["department"], "Sales");
    let etag = r.header("etag").unwrap().to_owned();
    assert_eq!(r.body["meta"]["version"], etag);

    let g = d.get(&format!("/Users/{id}")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body["name"]["givenName"], "Given");
    assert_eq!(g.header("etag"), Some(etag.as_str()));

    let mut replacement = user("alice@example.com");
    replacement["displayName"] = json!("Alice A.");
    let p = d.put(&format!("/Users/{id}"), replacement).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["displayName"], "Alice A.");
    assert!(p.body.get(ENTERPRISE).is_none(), "PUT replaces everything");
    assert_ne!(p.header("etag"), Some(etag.as_str()), "version moves");
    assert_eq!(p.body["meta"]["created"], r.body["meta"]["created"]);

    let del = d.delete(&format!("/Users/{id}")).await;
    assert_eq!(del.status, 204);
    let gone = d.get(&format!("/Users/{id}")).await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.body["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:Error"
    );
    assert_eq!(gone.body["status"], "404");
    assert_eq!(d.delete(&format!("/Users/{id}")).await.status, 404);
}

#[tokio::test]
async fn user_name_is_unique_case_insensitively() {
    let (logs, _guard) = crate::harness::LogBuf::capture();
    let d = TestDaemon::start().await;
    d.create_user("bob@example.com").await;
    let r = d.post("/Users", user("BOB@example.COM")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["scimType"], "uniqueness");
    // The refusal is logged at INFO, without the person's email: an identity provider
    // retrying the duplicate wrote it into the log at every try.
    let refused = logs.lines("Request refused.");
    assert!(
        refused.iter().any(|l| l.contains("already taken")),
        "{refused:?}"
    );
    assert!(
        !refused
            .iter()
            .any(|l| l.to_lowercase().contains("bob@example")),
        "{refused:?}"
    );
    // Renaming another user onto a taken name is refused too.
    let other = d.create_user("carol@example.com").await;
    let r = d
        .put(&format!("/Users/{other}"), user("Bob@Example.com"))
        .await;
    assert_eq!(r.status, 409);
    // The failed write changed nothing.
    let g = d.get(&format!("/Users/{other}")).await;
    assert_eq!(g.body["userName"], "carol@example.com");
}

#[tokio::test]
async fn etags_drive_preconditions() {
    let d = TestDaemon::start().await;
    let r = d.post("/Users", user("etag@example.com")).await;
    let id = r.body["id"].as_str().unwrap().to_owned();
    let etag = r.header("etag").unwrap().to_owned();
    let path = format!("/Users/{id}");

    let nm = d
        .scim_with(Method::GET, &path, None, &[("if-none-match", &etag)])
        .await;
    assert_eq!(nm.status, 304);

    let stale = d
        .scim_with(
            Method::PUT,
            &path,
            Some(user("etag@example.com")),
            &[("if-match", "W/\"999999\"")],
        )
        .await;
    assert_eq!(stale.status, 412, "{}", stale.body);

    let fresh = d
        .scim_with(
            Method::PATCH,
            &path,
            Some(patch_op(
                json!([{"op": "replace", "path": "displayName", "value": "E"}]),
            )),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    let new_etag = fresh.header("etag").unwrap().to_owned();
    assert_ne!(new_etag, etag);

    // A GET reads only a version it names.
    let read = d
        .scim_with(Method::GET, &path, None, &[("if-match", &etag)])
        .await;
    assert_eq!(read.status, 412, "{}", read.body);
    assert_eq!(read.body["status"], "412", "{}", read.body);
    for tags in [new_etag.as_str(), "*", &format!("{etag}, {new_etag}")] {
        let read = d
            .scim_with(Method::GET, &path, None, &[("if-match", tags)])
            .await;
        assert_eq!(read.status, 200, "{tags}: {}", read.body);
        assert_eq!(read.body["displayName"], "E");
    }

    let old = d
        .scim_with(Method::DELETE, &path, None, &[("if-match", &etag)])
        .await;
    assert_eq!(old.status, 412);
    let ok = d
        .scim_with(Method::DELETE, &path, None, &[("if-match", &new_etag)])
        .await;
    assert_eq!(ok.status, 204);
}

#[tokio::test]
async fn writes_survive_a_restart() {
    let d = TestDaemon::start().await;
    let id = d.create_user("durable@example.com").await;
    let gid = d.create_group("Durable").await;
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "add", "path": "members", "value": [{"value": id}]}])),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let d = d.restart().await;
    let u = d.get(&format!("/Users/{id}")).await;
    assert_eq!(u.status, 200);
    assert_eq!(u.body["userName"], "durable@example.com");
    assert_eq!(u.body["groups"][0]["value"], gid.as_str());
    let g = d.get(&format!("/Groups/{gid}")).await;
    assert_eq!(g.body["members"][0]["value"], id.as_str());
}

#[tokio::test]
async fn tokens_open_only_their_own_tenant() {
    let d = TestDaemon::start().await;
    let id = d.create_user("iso@example.com").await;
    // No token: 401 with WWW-Authenticate.
    let r = d
        .raw(Method::GET, &d.scim_url("/Users"), None, &[], None)
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"rosterd\"")
    );
    assert_eq!(r.body["status"], "401");
    // Wrong token: 401, saying the token is what was refused (RFC 6750 §3.1).
    let r = d
        .raw(
            Method::GET,
            &d.scim_url("/Users"),
            Some("rsd_bogus"),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"rosterd\", error=\"invalid_token\"")
    );
    // Two Authorization headers, the good token first: 400, whichever a proxy reads.
    let bogus = [("authorization", "Bearer rsd_bogus")];
    let r = d
        .raw(
            Method::GET,
            &d.scim_url("/Users"),
            Some(&d.token),
            &bogus,
            None,
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("2 Authorization headers"),
        "{}",
        r.body
    );
    // The other tenant's valid token: 403 here.
    let r = d
        .raw(
            Method::GET,
            &d.scim_url(&format!("/Users/{id}")),
            Some(&d.other_token),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    // In its own tenant the user does not exist.
    let r = d
        .raw(
            Method::GET,
            &d.url(&format!("/scim/v2/{OTHER_TENANT}/Users/{id}")),
            Some(&d.other_token),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    let r = d
        .raw(
            Method::GET,
            &d.url(&format!(
                "/scim/v2/{OTHER_TENANT}/Users?filter=userName%20eq%20%22iso@example.com%22"
            )),
            Some(&d.other_token),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["totalResults"], 0);
}

#[tokio::test]
async fn password_is_accepted_but_never_returned() {
    let d = TestDaemon::start().await;
    let mut body = user("pw@example.com");
    body["password"] = json!("Secret-123");
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 201);
    assert!(r.body.get("password").is_none());
    let id = r.body["id"].as_str().unwrap();
    let g = d.get(&format!("/Users/{id}?attributes=password")).await;
    assert!(g.body.get("password").is_none());
}

/// Create a user with these emails; its id.
async fn user_with_emails(d: &TestDaemon, user_name: &str, emails: serde_json::Value) -> String {
    let mut body = user(user_name);
    body["emails"] = emails;
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// A PATCH adding these values to the user's emails.
async fn add_emails(d: &TestDaemon, id: &str, values: serde_json::Value) -> Resp {
    d.patch(
        &format!("/Users/{id}"),
        patch_op(json!([{"op": "add", "path": "emails", "value": values}])),
    )
    .await
}

/// The addresses of a user document marked primary.
fn primaries(user: &serde_json::Value) -> Vec<String> {
    user["emails"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["primary"] == true)
        .map(|e| e["value"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn at_most_one_email_is_primary() {
    let d = TestDaemon::start().await;
    let mut body = user("prim@example.com");
    body["emails"] = json!([
        {"value": "a@example.com", "primary": true},
        {"value": "b@example.com", "primary": "True"}
    ]);
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "invalidValue");

    let id = user_with_emails(
        &d,
        "prim@example.com",
        json!([{"value": "old@example.com", "type": "work", "primary": true}]),
    )
    .await;
    // A new primary address: the old one steps down, and the roster shows the new one.
    let r = add_emails(
        &d,
        &id,
        json!([{"value": "new@example.com", "type": "home", "primary": true}]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(primaries(&r.body), ["new@example.com"], "{}", r.body);
    let admin = d.jwt(TENANT, "roster:read");
    let u = d
        .roster(Method::GET, &format!("/users/{id}"), &admin, None)
        .await;
    assert_eq!(u.body["email"], "new@example.com", "{}", u.body);
    // And back by a filtered replace.
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "replace",
                "path": "emails[value eq \"old@example.com\"].primary", "value": true}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(primaries(&r.body), ["old@example.com"], "{}", r.body);
    // Operations apply in order (RFC 7644 §3.5.2): the primary address is rewritten, then
    // the home one made primary. The home one is the primary, as the last operation says.
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([
                {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "old2@example.com"},
                {"op": "replace", "path": "emails[value eq \"new@example.com\"].primary", "value": true}
            ])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(primaries(&r.body), ["new@example.com"], "{}", r.body);
}

/// An IdP re-adding an email the user has, in its own spelling (`"primary": "True"`,
/// `Value`, other letter case), leaves one email: two equal ones, both primary, made a
/// user its own GET-then-PUT (Okta's update) was refused for.
#[tokio::test]
async fn a_patch_adding_an_email_the_user_has_leaves_one() {
    let d = TestDaemon::start().await;
    let id = user_with_emails(
        &d,
        "again@example.com",
        json!([{"value": "p@example.com", "type": "work", "primary": true}]),
    )
    .await;
    for again in [
        json!({"value": "p@example.com", "type": "work", "primary": "True"}),
        json!({"Value": "P@Example.com", "Type": "Work"}),
        json!({"value": "p@example.com", "type": "work", "display": "Work"}),
    ] {
        let r = add_emails(&d, &id, json!([again])).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["emails"].as_array().unwrap().len(), 1, "{}", r.body);
        assert_eq!(primaries(&r.body).len(), 1, "{}", r.body);
    }
    let got = d.get(&format!("/Users/{id}")).await;
    assert_eq!(
        got.body["emails"][0]["display"], "Work",
        "the add's own sub-attributes kept"
    );
    // Another type is another email.
    let r = add_emails(&d, &id, json!([{"value": "p@example.com", "type": "home"}])).await;
    assert_eq!(r.body["emails"].as_array().unwrap().len(), 2, "{}", r.body);
    let put = d.put(&format!("/Users/{id}"), r.body.clone()).await;
    assert_eq!(put.status, 200, "GET then PUT back: {}", put.body);
    // The home address made primary while the work one is re-sent in other letters:
    // the primary is the one the client asked for, not the stored one re-sent.
    let id = user_with_emails(
        &d,
        "order@example.com",
        json!([{"value": "b@example.com", "type": "home"},
               {"value": "a@example.com", "type": "work", "primary": true}]),
    )
    .await;
    let r = add_emails(
        &d,
        &id,
        json!([{"value": "b@example.com", "type": "home", "primary": true},
               {"value": "A@EXAMPLE.COM", "type": "work"}]),
    )
    .await;
    assert_eq!(r.body["emails"].as_array().unwrap().len(), 2, "{}", r.body);
    // b@example.com is the home address: one primary, and it.
    assert_eq!(primaries(&r.body), ["b@example.com"], "{}", r.body);
    // Values a POST stored as sent are left as they are by a PATCH of something else.
    let sent = json!([{"value": "c@example.com", "type": "work"},
                      {"value": "C@EXAMPLE.COM", "primary": true}]);
    let id = user_with_emails(&d, "as-sent@example.com", sent.clone()).await;
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "replace", "path": "title", "value": "Engineer"}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["emails"], sent, "{}", r.body);
}

/// A key with a multi-byte character across its fourth byte is an attribute name like
/// any other (an IdP's custom attribute may have an accented name): it was cut there to
/// look for "urn:", and the request panicked (500), in /Bulk after the operations before
/// it were applied.
#[tokio::test]
async fn an_accented_attribute_name_is_taken_as_any_unknown_one() {
    let d = TestDaemon::start().await;
    let user = |name: &str, key: &str| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": name,
            key: "x",
        })
    };
    let plain = d.post("/Users", user("plain@acme.test", "aaaa")).await;
    let accented = d
        .post("/Users", user("accented@acme.test", "aaa\u{e9}"))
        .await;
    assert_eq!(plain.status, 201, "{}", plain.body);
    assert_eq!(accented.status, plain.status, "{}", accented.body);
    let id = accented.body["id"].as_str().unwrap().to_owned();
    let put = d
        .put(
            &format!("/Users/{id}"),
            user("accented@acme.test", "\u{e9}\u{e9}"),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let group = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": "Caf\u{e9}s",
        "caf\u{e9}": 1,
    });
    let g = d.post("/Groups", group).await;
    assert_eq!(g.status, 201, "{}", g.body);
    let bulk = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "one", "data": user("bulk1@acme.test", "aaaa")},
            {"method": "POST", "path": "/Users", "bulkId": "two", "data": user("bulk2@acme.test", "aaa\u{e9}")},
        ],
    });
    let r = d.post("/Bulk", bulk).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let statuses: Vec<_> = r.body["Operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(statuses, ["201", "201"], "{}", r.body);

    // A path-less PATCH with such a name ignores it, as any unknown one.
    let p = format!("/Users/{id}");
    let r = d
        .patch(
            &p,
            patch_op(json!([{"op": "add", "value": {"aaa\u{e9}": 1, "nickName": "Ace"}}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["nickName"], "Ace", "{}", r.body);
    assert!(r.body.get("aaa\u{e9}").is_none(), "{}", r.body);
    // More than 1,000 operations are refused before the write.
    let ops: Vec<_> = (0..1001)
        .map(|i| json!({"op": "replace", "path": "nickName", "value": format!("n{i}")}))
        .collect();
    let r = d.patch(&p, patch_op(json!(ops))).await;
    assert_eq!(
        (r.status.as_u16(), r.body["scimType"].as_str()),
        (400, Some("invalidValue")),
        "{}",
        r.body
    );
    assert!(
        r.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1001 operations")),
        "{}",
        r.body
    );
}

/// RFC 7644 §3.10: extension attributes SHOULD be qualified, not must. An unqualified
/// `department` or `manager`, which only the enterprise extension has, lands there
/// instead of being ignored (a POST) or refused (a PATCH path).
#[tokio::test]
async fn unqualified_enterprise_attributes_land_in_the_extension() {
    let d = TestDaemon::start().await;
    let boss = d.create_user("boss@acme.test").await;
    let r = d
        .post(
            "/Users",
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "plain@acme.test",
                "department": "Finance",
                "employeeNumber": "E-7",
                "manager": {"value": boss},
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let ext = &r.body[ENTERPRISE];
    assert_eq!(ext["department"], "Finance", "{}", r.body);
    assert_eq!(ext["employeeNumber"], "E-7", "{}", r.body);
    assert_eq!(ext["manager"]["value"], boss.as_str(), "{}", r.body);
    assert!(r.body.get("department").is_none(), "{}", r.body);
    let p = format!("/Users/{}", r.body["id"].as_str().unwrap());

    let r = d
        .patch(
            &p,
            patch_op(json!([
                {"op": "replace", "path": "department", "value": "Sales"},
                {"op": "replace", "value": {"costCenter": "CC-1"}},
                {"op": "remove", "path": "manager"},
            ])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ext = &r.body[ENTERPRISE];
    assert_eq!(ext["department"], "Sales", "{}", r.body);
    assert_eq!(ext["costCenter"], "CC-1", "{}", r.body);
    assert!(ext.get("manager").is_none(), "{}", r.body);

    // The Roster API reads the extension, so it sees them.
    let reader = d.jwt(TENANT, "roster:read");
    let u = d
        .roster(
            reqwest::Method::GET,
            "/users/user:plain@acme.test",
            &reader,
            None,
        )
        .await;
    assert_eq!(u.body["department"], "Sales", "{}", u.body);
    // A filter on the unqualified name finds the user too.
    let f = d.get("/Users?filter=department%20eq%20%22Sales%22").await;
    assert_eq!(f.status, 200, "{}", f.body);
    assert_eq!(f.body["totalResults"], 1, "{}", f.body);

    // A Group has no such attribute: a path-less PATCH ignores it, as any unknown one.
    let gid = d.create_group("Finance").await;
    let g = d
        .patch(
            &format!("/Groups/{gid}?excludedAttributes=members"),
            patch_op(json!([{"op": "replace", "value": {"department": "x", "displayName": "Finance Team"}}])),
        )
        .await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.body["displayName"], "Finance Team", "{}", g.body);
    let g = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "replace", "path": "department", "value": "x"}])),
        )
        .await;
    assert_eq!(g.status, 400, "{}", g.body);
    assert!(
        g.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("department is not an attribute of Group"),
        "{}",
        g.body
    );
}

/// An Entra custom extension attribute is ignored in a POST; a PATCH carrying it beside a
/// title change (by path, or keyed by its URN in a path-less value) applies the title and
/// skips the extension with one warning, where it was refused whole. An unknown attribute
/// of a schema rosterd has is still refused.
#[tokio::test]
async fn a_patch_skips_an_unknown_extension_and_applies_the_rest() {
    const CUSTOM: &str = "urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:User";
    let d = TestDaemon::start().await;
    let (logs, _guard) = LogBuf::capture();
    let mut body = user("buyer@acme.test");
    body["title"] = json!("Buyer");
    body[format!("{CUSTOM}:costCode")] = json!("CC-1");
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let path = format!("/Users/{id}");

    let r = d
        .patch(
            &path,
            patch_op(json!([
                {"op": "Replace", "path": "title", "value": "Senior Buyer"},
                {"op": "Replace", "path": format!("{CUSTOM}:costCode"), "value": "CC-2"},
            ])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["title"], "Senior Buyer");
    assert_eq!(r.body.get(CUSTOM), None);
    let warned = logs.lines("Ignored attributes that are not in the schema.");
    assert_eq!(warned.len(), 2, "the POST's and the PATCH's: {warned:?}");
    assert!(warned[1].contains("method=PATCH"), "{warned:?}");

    let r = d
        .patch(
            &path,
            patch_op(json!([{"op": "Replace", "value": {
                "title": "Lead Buyer",
                CUSTOM: {"costCode": "CC-3"},
                format!("{CUSTOM}:site"): "HQ",
            }}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["title"], "Lead Buyer");
    let warned = logs.lines("Ignored attributes that are not in the schema.");
    assert_eq!(warned.len(), 3, "one for the request: {warned:?}");

    for path_text in [
        format!("{ENTERPRISE}:costCode"),
        "urn:ietf:params:scim:schemas:core:2.0:User:titel".to_owned(),
    ] {
        let r = d
            .patch(
                &path,
                patch_op(json!([
                    {"op": "Replace", "path": "title", "value": "Buyer"},
                    {"op": "Replace", "path": path_text, "value": "x"},
                ])),
            )
            .await;
        assert_eq!(r.status, 400, "{path_text}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidPath", "{}", r.body);
    }
    assert_eq!(d.get(&path).await.body["title"], "Lead Buyer");
}

/// Google and JumpCloud mappings put the manager's email or employee number in
/// `manager.value`. It is kept (an IdP must not start failing), and the operator hears of
/// it: a WARN naming the user and the value, escaped for the terminal, and a counter. A
/// value the user already held (a manager deleted since) is not said again.
#[tokio::test]
async fn a_manager_value_naming_no_user_is_kept_warned_and_counted() {
    const WARNED: &str = "manager.value names no user";
    const COUNTER: &str = "rosterd_scim_unresolved_managers_total";
    let d = TestDaemon::start().await;
    let (logs, _guard) = LogBuf::capture();
    let counted = || async {
        let (_, samples) = crate::metrics::scrape(&d).await;
        crate::metrics::value(&samples, COUNTER, &[("tenant", TENANT)]).unwrap_or(0.0)
    };
    let at_start = counted().await;
    let boss = d.create_user("boss@acme.test").await;

    let mut body = user("report@acme.test");
    body[ENTERPRISE] = json!({"manager": {"value": "boss@acme.test"}});
    let r = d.post("/Users", body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body[ENTERPRISE]["manager"]["value"], "boss@acme.test");
    let id = r.body["id"].as_str().unwrap().to_owned();
    let path = format!("/Users/{id}");
    let warned = logs.lines(WARNED);
    assert_eq!(warned.len(), 1, "{warned:?}");
    for part in ["tenant=acme", &format!("user={id}"), "\"boss@acme.test\""] {
        assert!(warned[0].contains(part), "{part}: {warned:?}");
    }
    assert_eq!(counted().await - at_start, 1.0);

    // The same value again: said once already.
    let r = d.put(&path, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(logs.lines(WARNED).len(), 1);

    // A new one, with a terminal escape in it.
    let r = d
        .patch(
            &path,
            patch_op(
                json!([{"op": "replace", "path": format!("{ENTERPRISE}:manager.value"),
                             "value": "E-00042\u{1b}[2J"}]),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let warned = logs.lines(WARNED);
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(!warned[1].contains('\u{1b}'), "{warned:?}");
    assert!(warned[1].contains("E-00042"), "{warned:?}");
    assert_eq!(counted().await - at_start, 2.0);

    // The manager's id: linked, nothing said.
    let r = d
        .patch(
            &path,
            patch_op(
                json!([{"op": "replace", "path": format!("{ENTERPRISE}:manager"),
                             "value": {"value": boss}}]),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(logs.lines(WARNED).len(), 2);
    let admin = d.jwt(TENANT, "roster:read");
    let r = d
        .roster(Method::GET, "/users/user:report@acme.test", &admin, None)
        .await;
    assert_eq!(
        r.body["manager_user_id"], "user:boss@acme.test",
        "{}",
        r.body
    );
}

/// Entra clears a user's work address by removing its value: the element goes with it,
/// where a primary email with no address stayed (one a PATCH may not make), and the
/// Roster API then takes the next address.
#[tokio::test]
async fn removing_the_work_emails_value_removes_the_email() {
    let d = TestDaemon::start().await;
    let mut body = user("w@example.com");
    body["emails"] = json!([
        {"value": "w@example.com", "type": "work", "primary": true},
        {"value": "h@example.com", "type": "home"},
    ]);
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let p = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "Remove", "path": "emails[type eq \"work\"].value"}])),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(
        p.body["emails"],
        json!([{"value": "h@example.com", "type": "home"}]),
        "{}",
        p.body
    );
    let admin = d.jwt(TENANT, "roster:read");
    let r = d
        .roster(Method::GET, &format!("/users/{id}"), &admin, None)
        .await;
    assert_eq!(r.body["email"], "h@example.com", "{}", r.body);
}

/// Entra's older dialect adds a `roles` entry as its JSON text and removes it the same
/// way: the remove answered 200 and left the role, in the document and downstream.
#[tokio::test]
async fn a_role_added_and_removed_as_json_text_is_gone() {
    let d = TestDaemon::start().await;
    let id = d.create_user("roles@example.com").await;
    let reader = r#"{"primary":false,"type":"WindowsAzureActiveDirectoryRole","value":"Reader"}"#;
    let path = format!("/Users/{id}");
    let p = d
        .patch(
            &path,
            patch_op(json!([{"op": "Add", "path": "roles", "value": [reader, "[{\"value\":\"Writer\"}]"]}])),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(
        p.body["roles"],
        json!([
            {"primary": false, "type": "WindowsAzureActiveDirectoryRole", "value": "Reader"},
            {"value": "Writer"},
        ])
    );
    let p = d
        .patch(
            &path,
            patch_op(json!([{"op": "Remove", "path": "roles", "value": [reader]}])),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["roles"], json!([{"value": "Writer"}]), "{}", p.body);
    assert_eq!(
        d.get(&path).await.body["roles"],
        json!([{"value": "Writer"}])
    );
}

/// `leaver@example.com`, created deactivated; its id.
async fn create_leaver(d: &TestDaemon) -> String {
    let mut body = user("leaver@example.com");
    body["active"] = json!(false);
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// A PATCH that makes `active` null keeps a leaver deactivated, as a PUT without it does:
/// a user without `active` reads as active, so each of these reactivated the leaver in
/// the roster, the exports and downstream. An explicit `remove` of `active` removes it,
/// as RFC 7644 says and the public conformance suite checks: the user reads as active.
#[tokio::test]
async fn a_patch_that_makes_active_null_keeps_a_deactivated_user_deactivated() {
    let d = TestDaemon::start().await;
    let id = create_leaver(&d).await;
    let admin = d.jwt(TENANT, "roster:admin");
    let roster_active = || async {
        let r = d
            .roster(Method::GET, &format!("/users/{id}"), &admin, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["is_active"].clone()
    };
    for ops in [
        json!([{"op": "replace", "path": "active", "value": null}]),
        json!([{"op": "Replace", "path": "urn:ietf:params:scim:schemas:core:2.0:User:ACTIVE", "value": null}]),
        json!([{"op": "replace", "value": {"active": null}}]),
        json!([{"op": "add", "value": {"active": null, "title": "Buyer"}}]),
    ] {
        let p = d
            .patch(&format!("/Users/{id}"), patch_op(ops.clone()))
            .await;
        assert_eq!(p.status, 200, "{ops}: {}", p.body);
        assert_eq!(p.body["active"], false, "{ops}: {}", p.body);
        assert_eq!(roster_active().await, false, "{ops}");
    }
    // In /Bulk too.
    let bulk = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
        "Operations": [{
            "method": "PATCH",
            "path": format!("/Users/{id}"),
            "data": patch_op(json!([{"op": "replace", "value": {"active": null}}])),
        }],
    });
    let r = d.post("/Bulk", bulk).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["Operations"][0]["status"], "200", "{}", r.body);
    assert_eq!(roster_active().await, false);
    let found = d
        .get("/Users?filter=userName%20eq%20%22leaver@example.com%22%20and%20active%20eq%20true")
        .await;
    assert_eq!(found.body["totalResults"], 0, "{}", found.body);
    // An explicit remove takes the attribute away, whatever the case of its path.
    for path in [
        "active",
        "urn:ietf:params:scim:schemas:core:2.0:User:Active",
    ] {
        let p = d
            .patch(
                &format!("/Users/{id}"),
                patch_op(json!([
                    {"op": "replace", "path": "active", "value": false},
                    {"op": "Remove", "path": path},
                ])),
            )
            .await;
        assert_eq!(p.status, 200, "{}", p.body);
        assert!(p.body["active"].is_null(), "{path}: {}", p.body);
        assert_eq!(roster_active().await, true, "{path}");
    }
    // Saying so deactivates and reactivates.
    for (sent, active) in [("False", false), ("True", true)] {
        let p = d
            .patch(
                &format!("/Users/{id}"),
                patch_op(json!([{"op": "Replace", "path": "active", "value": sent}])),
            )
            .await;
        assert_eq!(p.body["active"], active, "{}", p.body);
        assert_eq!(roster_active().await, active);
    }
}

/// A PUT that leaves `active` out keeps a leaver deactivated: an HR client's PUT of a new
/// title gave a deactivated user their access back. Only `active: true` reactivates.
#[tokio::test]
async fn a_put_without_active_keeps_a_deactivated_user_deactivated() {
    let d = TestDaemon::start().await;
    let id = create_leaver(&d).await;
    let mut put = user("leaver@example.com");
    put.as_object_mut().unwrap().remove("active");
    put["title"] = json!("Buyer");
    let p = d.put(&format!("/Users/{id}"), put.clone()).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.body["active"], false, "{}", p.body);
    assert_eq!(p.body["title"], "Buyer");
    let found = d
        .get("/Users?filter=userName%20eq%20%22leaver@example.com%22%20and%20active%20eq%20true")
        .await;
    assert_eq!(found.body["totalResults"], 0, "{}", found.body);
    // An active user sent without `active` stays active, as before.
    let r = d.post("/Users", user("stayer@example.com")).await;
    let stayer = r.body["id"].as_str().unwrap().to_owned();
    let mut put2 = user("stayer@example.com");
    put2.as_object_mut().unwrap().remove("active");
    let p = d.put(&format!("/Users/{stayer}"), put2).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body["active"].is_null(), "kept as sent: {}", p.body);
    // Saying so reactivates.
    put["active"] = json!(true);
    let p = d.put(&format!("/Users/{id}"), put).await;
    assert_eq!(p.body["active"], true, "{}", p.body);
}
