use crate::harness::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn malformed_input_gets_scim_errors() {
    let d = TestDaemon::start().await;
    let bad_json = d
        .raw(
            Method::POST,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[],
            Some(b"{not json".to_vec()),
        )
        .await;
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.body["scimType"], "invalidSyntax");
    // Which of two userNames was meant is not the server's to guess.
    let twice = d
        .raw(
            Method::POST,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[],
            Some(br#"{"userName": "first@x", "active": true, "userName": "second@x"}"#.to_vec()),
        )
        .await;
    assert_eq!(twice.status, 400, "{}", twice.body);
    assert_eq!(twice.body["scimType"], "invalidSyntax");
    let detail = twice.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("the key \"userName\" is given twice"),
        "{detail}"
    );
    // Nor of two spellings of one attribute (names are case-insensitive).
    let spelled_twice = d
        .post(
            "/Users",
            json!({"userName": "first@x", "USERNAME": "second@x"}),
        )
        .await;
    assert_eq!(spelled_twice.status, 400, "{}", spelled_twice.body);
    assert_eq!(spelled_twice.body["scimType"], "invalidSyntax");
    let gzipped = d
        .raw(
            Method::POST,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[("content-encoding", "gzip")],
            Some(br#"{"userName": "zipped@x"}"#.to_vec()),
        )
        .await;
    assert_eq!(gzipped.status, 415, "{}", gzipped.body);
    assert_eq!(
        gzipped.body["schemas"],
        json!(["urn:ietf:params:scim:api:messages:2.0:Error"])
    );
    let detail = gzipped.body["detail"].as_str().unwrap();
    assert!(detail.contains("Content-Encoding gzip"), "{detail}");
    assert_eq!(gzipped.header("accept-encoding"), Some("identity"));
    // Judged only after the token, and only where a body is read.
    let gzipped = d
        .raw(
            Method::POST,
            &d.scim_url("/Users"),
            None,
            &[("content-encoding", "gzip")],
            Some(br#"{"userName": "zipped@x"}"#.to_vec()),
        )
        .await;
    assert_eq!(gzipped.status, 401, "{}", gzipped.body);
    let ignored = d
        .raw(
            Method::GET,
            &d.scim_url("/Users"),
            Some(&d.token),
            &[("content-encoding", "gzip")],
            Some(b"hello".to_vec()),
        )
        .await;
    assert_eq!(ignored.status, 200, "{}", ignored.body);
    let listed = d.get("/Users").await;
    assert_eq!(
        listed.body["totalResults"], 0,
        "nothing provisioned: {}",
        listed.body
    );

    let missing = d
        .post(
            "/Users",
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "displayName": "x"}),
        )
        .await;
    assert_eq!(missing.status, 400, "{}", missing.body);
    assert_eq!(missing.body["scimType"], "invalidValue");

    let wrong_type = d.post("/Users", json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "t@x", "active": "maybe"})).await;
    assert_eq!(wrong_type.status, 400, "{}", wrong_type.body);
    assert_eq!(wrong_type.body["scimType"], "invalidValue");
    // A complex attribute without a `value` cannot take a bare string (Entra's bare
    // manager id still works: manager has a `value`).
    let name_string = d.post("/Users", json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "n@x", "name": "Ada Lovelace"})).await;
    assert_eq!(name_string.status, 400, "{}", name_string.body);
    assert_eq!(name_string.body["scimType"], "invalidValue");
    assert!(
        name_string.body["detail"]
            .as_str()
            .unwrap()
            .contains("name: expected an object"),
        "{}",
        name_string.body
    );

    let id = d.create_user("errs@example.com").await;
    let p = format!("/Users/{id}");
    let bad_path = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "path": "emails[type eq", "value": "x"}])),
        )
        .await;
    assert_eq!(bad_path.status, 400);
    assert_eq!(bad_path.body["scimType"], "invalidPath");
    let no_target = d.patch(&p, patch_op(json!([{"op": "remove"}]))).await;
    assert_eq!(no_target.status, 400);
    assert_eq!(no_target.body["scimType"], "noTarget");
    let read_only = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "path": "id", "value": "other"}])),
        )
        .await;
    assert_eq!(read_only.status, 400);
    assert_eq!(read_only.body["scimType"], "mutability");
    let bad_op = d
        .patch(
            &p,
            patch_op(json!([{"op": "frobnicate", "path": "displayName", "value": "x"}])),
        )
        .await;
    assert_eq!(bad_op.status, 400, "{}", bad_op.body);
    // A bare string is a `value`: `name` has none, so "Jane Doe" would have vanished.
    let name_string = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "path": "name", "value": "Jane Doe"}])),
        )
        .await;
    assert_eq!(name_string.status, 400, "{}", name_string.body);
    assert_eq!(name_string.body["scimType"], "invalidValue");
    // A filter on a sub-attribute the attribute lacks matches nothing, and the add would
    // have made an untyped address from it.
    let typo = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "path": "emails[typo eq \"work\"].value", "value": "n@x"}])),
        )
        .await;
    assert_eq!(typo.status, 400, "{}", typo.body);
    assert_eq!(typo.body["scimType"], "invalidPath");
    assert!(
        typo.body["detail"]
            .as_str()
            .unwrap()
            .contains("typo is not a sub-attribute of emails"),
        "{}",
        typo.body
    );
    // A NUL character would travel on into CSV cells and downstream targets.
    let nul = d
        .patch(
            &p,
            patch_op(json!([{"op": "replace", "path": "title", "value": "Eng\u{0}ineer"}])),
        )
        .await;
    assert_eq!(nul.status, 400, "{}", nul.body);
    assert_eq!(nul.body["scimType"], "invalidValue");
    assert!(
        nul.body["detail"]
            .as_str()
            .unwrap()
            .contains("title: the value contains a NUL"),
        "{}",
        nul.body
    );
    for body in [
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "n\u{0}l@x"}),
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "nul@x", "externalId": "\u{0}"}),
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "nul@x", "emails": [{"value": "a\u{0}@x"}]}),
    ] {
        let r = d.post("/Users", body.clone()).await;
        assert_eq!(r.status, 400, "{body} {}", r.body);
        assert_eq!(r.body["scimType"], "invalidValue", "{}", r.body);
    }
    // Nor in a member's display, added by PATCH.
    let gid = d.create_group("Nul").await;
    let r = d
        .patch(
            &format!("/Groups/{gid}"),
            patch_op(json!([{"op": "add", "path": "members", "value": [{"value": id, "display": "a\u{0}b"}]}])),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "invalidValue", "{}", r.body);
    // A password of the wrong type is refused without echoing it.
    let pw = d
        .post(
            "/Users",
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "pw@x", "password": ["HUNTER4-SECRET"]}),
        )
        .await;
    assert_eq!(pw.status, 400, "{}", pw.body);
    assert!(!pw.body.to_string().contains("HUNTER4"), "{}", pw.body);
    // None of the failed requests changed the user.
    let g = d.get(&p).await;
    assert_eq!(g.body["meta"]["version"], g.header("etag").unwrap());
    assert_eq!(g.body["userName"], "errs@example.com");
    assert_eq!(g.body["emails"].as_array().unwrap().len(), 1, "{}", g.body);

    // The manager's displayName is the client's to set, as /Schemas says: a POST keeps
    // it, and a PATCH may change it.
    let manager = format!("{ENTERPRISE}:manager.displayName");
    let r = d
        .patch(
            &p,
            patch_op(json!([{"op": "add", "path": manager, "value": "Boss"}])),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body[ENTERPRISE]["manager"]["displayName"], "Boss",
        "{}",
        r.body
    );
    let schema = d.get(&format!("/Schemas/{ENTERPRISE}")).await;
    let attrs = schema.body["attributes"].as_array().unwrap();
    let m = attrs.iter().find(|a| a["name"] == "manager").unwrap();
    let shown = m["subAttributes"].as_array().unwrap();
    let dn = shown.iter().find(|a| a["name"] == "displayName").unwrap();
    assert_eq!(dn["mutability"], "readWrite", "{dn}");
}

#[tokio::test]
async fn a_query_string_that_does_not_decode_is_refused() {
    let d = TestDaemon::start().await;
    // A query value that is not UTF-8 once decoded is refused: read as U+FFFD, the
    // filter matched no one and the list came back empty. `+` stays a space.
    d.create_user("plus+tag@x").await;
    for (query, found) in [
        ("filter=userName+eq+%22%FF%22", None),
        ("%FF=1", None),
        ("filter=userName+eq+%22plus%2Btag@x%22", Some(1)),
    ] {
        let r = d.get(&format!("/Users?{query}")).await;
        match found {
            None => {
                assert_eq!(r.status, 400, "{query}: {}", r.body);
                assert_eq!(r.body["scimType"], "invalidValue", "{}", r.body);
                let detail = r.body["detail"].as_str().unwrap();
                assert!(detail.contains("not UTF-8"), "{detail}");
            }
            Some(n) => {
                assert_eq!(r.status, 200, "{query}: {}", r.body);
                assert_eq!(r.body["totalResults"], n, "{query}: {}", r.body);
            }
        }
    }
    // Without the token, the same queries are 401 wherever they go: the query is judged
    // only for a client the tenant knows.
    for path in [
        "/Users",
        "/Groups/g1",
        "/",
        "/Schemas",
        "/ServiceProviderConfig",
    ] {
        let url = format!("{}?filter=%FF", d.scim_url(path).trim_end_matches('/'));
        for token in [None, Some("not-the-token")] {
            let r = d.raw(Method::GET, &url, token, &[], None).await;
            assert_eq!(r.status, 401, "{url} with {token:?}: {}", r.body);
            assert_eq!(
                r.body["schemas"],
                json!(["urn:ietf:params:scim:api:messages:2.0:Error"])
            );
        }
    }
}

/// A detail quoting what the client sent is cut: a 60,000-byte value came back whole.
#[tokio::test]
async fn a_detail_quoting_a_long_value_is_cut() {
    let d = TestDaemon::start().await;
    let long = "x".repeat(60_000);
    let r = d.get(&format!("/Users?sortOrder={long}")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let detail = r.body["detail"].as_str().unwrap();
    assert!(detail.contains("bytes in all)"), "{detail}");
    assert!(detail.len() < 1200, "{} bytes", detail.len());
    // In a /Bulk answer too, once per operation.
    let op = json!({"method": "DELETE", "path": format!("/Users/{long}")});
    let r = d
        .post(
            "/Bulk",
            json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
                "Operations": [op.clone(), op],
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for o in r.body["Operations"].as_array().unwrap() {
        let detail = o["response"]["detail"].as_str().unwrap();
        assert!(detail.contains("bytes in all)"), "{detail}");
        assert!(detail.len() < 1200, "{} bytes", detail.len());
    }
}

/// Bodies over 1 MiB take turns within `max_body_bytes`: here each is three quarters of
/// it, so no two are handled at once. Every one must still get its answer (a share
/// never given back would hang the rest, which the timeout turns into a failure), on
/// both APIs, and what each wrote must be there.
#[tokio::test]
async fn large_bodies_take_turns_and_each_is_answered() {
    const LIMIT: usize = 2 << 20;
    let d = TestDaemon::start_with(Options {
        max_body_bytes: LIMIT,
        ..Options::default()
    })
    .await;
    // JSON's whitespace makes a body large without making the resource large.
    let padded = |v: serde_json::Value| {
        let mut b = serde_json::to_vec(&v).expect("json");
        b.resize(LIMIT * 3 / 4, b' ');
        b
    };
    let admin = d.jwt(TENANT, "roster:read roster:write roster:admin");
    let scim = d.scim_url("/Users");
    let posts = (0..4).map(|i| {
        let body = padded(user(&format!("large{i}@example.com")));
        d.raw(Method::POST, &scim, Some(&d.token), &[], Some(body))
    });
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        futures_util::future::join_all(posts),
    )
    .await
    .expect("every large body is answered");
    let mut ids = Vec::new();
    for r in answered {
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.body["id"].as_str().expect("id").to_owned());
    }
    let patch = padded(patch_op(
        json!([{"op": "replace", "path": "title", "value": "account executive"}]),
    ));
    let r = d
        .raw(
            Method::PATCH,
            &d.scim_url(&format!("/Users/{}", ids[0])),
            Some(&d.token),
            &[],
            Some(patch),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["title"], "account executive");
    let body = padded(json!({"archetype_id": "sales_rep"}));
    let r = d
        .client
        .patch(d.url(&format!("/api/v1/roster/users/{}", ids[1])))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let r = d
        .roster(Method::GET, &format!("/users/{}", ids[1]), &admin, None)
        .await;
    assert_eq!(r.body["archetype_id"], "sales_rep", "{}", r.body);
    let r = d.get("/Users?filter=userName sw \"large\"").await;
    assert_eq!(r.body["totalResults"], 4, "{}", r.body);
}

#[tokio::test]
async fn limits_and_unsupported_things() {
    let d = TestDaemon::start_with(Options {
        max_body_bytes: 4096,
        ..Options::default()
    })
    .await;
    let mut big = user("big@example.com");
    big["displayName"] = json!("x".repeat(10_000));
    let r = d.post("/Users", big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body["status"], "413");

    let r = d.get("/Me").await;
    assert_eq!(r.status, 501);
    let r = d
        .raw(
            Method::GET,
            &d.url(&format!("/scim/v1/{TENANT}/Users")),
            Some(&d.token),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["scimType"], "invalidVers");
    let r = d.get("/Nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["status"], "404");
    let r = d.get("/Users?sortOrder=sideways").await;
    assert_eq!(r.status, 400);
    let r = d.get("/Users?count=abc").await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["detail"].as_str().unwrap().contains("count"),
        "{}",
        r.body
    );

    // What axum answers before a handler runs is a SCIM error too, not an empty body.
    for method in [Method::DELETE, Method::OPTIONS] {
        let r = d
            .raw(
                method.clone(),
                &d.scim_url("/Users"),
                Some(&d.token),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("content-type"), Some("application/scim+json"));
        assert_eq!(r.body["status"], "405", "{}", r.body);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("does not take {method}")),
            "{detail}"
        );
        assert!(
            r.header("allow").unwrap().contains("POST"),
            "{:?}",
            r.headers
        );
    }
    let r = d.get("/Users/%FF").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["status"], "400", "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("UTF-8"),
        "{}",
        r.body
    );
}

/// A document for another resource type, or a list no person has, is refused: 300,000
/// emails in a 15 MB body took the daemon past 1 GB.
#[tokio::test]
async fn a_resource_must_be_of_its_endpoint_and_of_a_sane_size() {
    let d = TestDaemon::start().await;
    let group_doc = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "userName": "g@example.com", "displayName": "G"});
    let r = d.post("/Users", group_doc).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "invalidSyntax");
    assert!(
        r.body["detail"].as_str().unwrap().contains("core:2.0:User"),
        "{}",
        r.body
    );
    let r = d
        .post(
            "/Users",
            json!({"schemas": "urn:ietf:params:scim:schemas:core:2.0:User", "userName": "s@x"}),
        )
        .await;
    assert_eq!(r.status, 400, "schemas is a list: {}", r.body);
    // Entra adds one of Microsoft's URNs beside the core one; no schemas at all is taken.
    let r = d
        .post("/Groups", json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group",
            "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/Group"], "displayName": "G"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = d
        .post("/Users", json!({"userName": "bare@example.com"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();

    let many: Vec<_> = (0..1001)
        .map(|i| json!({"value": format!("e{i}@example.com")}))
        .collect();
    let mut body = user("many@example.com");
    body["emails"] = json!(many[..1000]);
    assert_eq!(
        d.post("/Users", body.clone()).await.status,
        201,
        "1,000 is taken"
    );
    body["userName"] = json!("more@example.com");
    body["emails"] = json!(many);
    let r = d.post("/Users", body).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["scimType"], "invalidValue");
    assert!(
        r.body["detail"].as_str().unwrap().contains("emails"),
        "{}",
        r.body
    );
    // Or piled up by a PATCH.
    let r = d
        .patch(
            &format!("/Users/{id}"),
            patch_op(json!([{"op": "add", "path": "emails", "value": many}])),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        d.get(&format!("/Users/{id}")).await.body.get("emails"),
        None
    );
    // Nor grown past 1 MiB PATCH by PATCH, each well inside the limits on values.
    let line = "x".repeat(60_000);
    let ten = |from: usize| {
        let v: Vec<_> = (from..from + 10)
            .map(|i| json!({"type": format!("t{i}"), "formatted": line}))
            .collect();
        patch_op(json!([{"op": "add", "path": "addresses", "value": v}]))
    };
    let r = d.patch(&format!("/Users/{id}"), ten(0)).await;
    assert_eq!(r.status, 200, "600 kB is taken");
    let r = d.patch(&format!("/Users/{id}"), ten(10)).await;
    assert_eq!(r.status, 400, "1.2 MB is not");
    assert!(
        r.body["detail"].as_str().unwrap().contains("bytes as JSON"),
        "{}",
        r.body
    );
    // An empty schemas list says no more than none.
    let r = d
        .post(
            "/Users",
            json!({"schemas": [], "userName": "empty-schemas@example.com"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A long `or`/`and` chain is one tree as deep as it is long: 7,000 terms used to overflow
/// a worker's stack and abort the daemon for every tenant.
#[tokio::test]
async fn long_filters_are_refused_and_the_daemon_stays_up() {
    let d = TestDaemon::start().await;
    d.create_user("a@x").await;
    d.create_user("b@x").await;
    let chain = |n: usize, term: &dyn Fn(usize) -> String, joint: &str| {
        (0..n).map(term).collect::<Vec<_>>().join(joint)
    };
    let names = |i: usize| match i {
        0 => r#"userName eq "a@x""#.to_owned(),
        1 => r#"userName eq "b@x""#.to_owned(),
        i => format!(r#"userName eq "n{i}""#),
    };
    let search = |filter: String| {
        json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
            "filter": filter,
        })
    };
    let max = rosterd::scim::filter::MAX_TERMS;
    // The longest allowed chains are evaluated: both users found, or both kept by `pr`.
    let r = d
        .post("/Users/.search", search(chain(max, &names, " or ")))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totalResults"], 2, "{}", r.body);
    let all = |_| "userName pr".to_owned();
    let r = d
        .post("/Users/.search", search(chain(max, &all, " and ")))
        .await;
    assert_eq!(r.body["totalResults"], 2, "{}", r.body);
    let in_url = chain(max, &names, " or ")
        .replace(' ', "%20")
        .replace('"', "%22");
    let r = d.get(&format!("/Users?filter={in_url}")).await;
    assert_eq!(r.body["totalResults"], 2, "{}", r.body);

    for (path, n, joint) in [
        ("/Users/.search", max + 1, " or "),
        ("/Users/.search", 7_000, " and "),
        ("/Groups/.search", 10_000, " or "),
    ] {
        let r = d.post(path, search(chain(n, &all, joint))).await;
        assert_eq!(r.status, 400, "{path} {n}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidFilter");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("more than {max} comparisons")),
            "{detail}"
        );
    }
    let r = d.get("/Users").await;
    assert_eq!(r.body["totalResults"], 2, "{}", r.body);
}

#[tokio::test]
async fn too_many_to_sort_is_reported() {
    let d = TestDaemon::start_with(Options {
        scim: rosterd::config::ScimConfig {
            max_sort_results: 2,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    for i in 0..3 {
        d.create_user(&format!("s{i}@example.com")).await;
    }
    let r = d.get("/Users?sortBy=userName").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["scimType"], "tooMany");
    let r = d.get("/Users").await;
    assert_eq!(r.body["totalResults"], 3);
}

/// Send `head` then `body_start` on a raw connection and stop, as a stalled client would
/// (or, with `shut`, also shut the sending side, as `nc -N` does); returns what the daemon
/// answers before it closes the connection (empty if it closes without a word).
async fn stall(d: &TestDaemon, head: String, body_start: &str, shut: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body_start.as_bytes()).await.unwrap();
    if shut {
        conn.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    // Well past the daemon's 1 s: it must end the exchange itself.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        conn.read_to_end(&mut answer),
    )
    .await
    .expect("the daemon kept a stalled client's connection open")
    .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request without a valid token is refused on its headers: its body is never read,
/// so a client without credentials cannot get the daemon to buffer `max_body_bytes`
/// (16 MiB in the example) for each connection it opens.
#[tokio::test]
async fn a_request_without_a_valid_token_is_refused_before_its_body_is_read() {
    let d = TestDaemon::start_with(Options {
        client_timeout_secs: 1,
        ..Options::default()
    })
    .await;
    let addr = d.addr;
    // A body announced but only begun: reading it would stall until the 408.
    let post = |path: &str, auth: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
    };
    let scim = [
        format!("/scim/v2/{TENANT}/Users"),
        format!("/scim/v2/{TENANT}/Groups/.search"),
        format!("/scim/v2/{TENANT}/Bulk"),
        format!("/scim/v2/{TENANT}/.search"),
    ];
    for path in &scim {
        let answer = stall(&d, post(path, "not-the-token"), "{\"schemas\"", false).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        // The body left unread, the connection cannot be reused: the client is told.
        assert!(
            answer.to_lowercase().contains("connection: close"),
            "{path}: {answer}"
        );
        assert!(
            answer.contains("urn:ietf:params:scim:api:messages:2.0:Error"),
            "{path}: {answer}"
        );
    }
    let bad_jwt = "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl";
    for path in [
        "/api/v1/roster/archetype:bulk-assign",
        "/api/v1/roster/scim:sync",
    ] {
        let answer = stall(&d, post(path, bad_jwt), "{\"a\"", false).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert!(answer.contains("\"error\":\"token_"), "{path}: {answer}");
    }
    // A read-only token is refused a write before its body is read, too.
    let reader = d.jwt(TENANT, "roster:read");
    let answer = stall(
        &d,
        post("/api/v1/roster/archetype:bulk-assign", &reader),
        "{\"a\"",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // With the token, the same stalled body is still waited for, and ends in 408.
    let answer = stall(&d, post(&scim[0], &d.token), "{\"schemas\"", false).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A body read to its end leaves the connection open for the next request.
    let r = d.post("/Users", user("kept@example.com")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("connection"), None);
}

/// An answer given with the body unread says the connection closes, on the errors axum
/// answers before any handler (no such route, a method the route does not take) as on a
/// handler's: the SCIM and Roster API error bodies those get are built afresh, and they
/// used to drop the header (python-requests then lost a request in 30 to a dead
/// connection).
#[tokio::test]
async fn an_answer_to_a_body_left_unread_says_the_connection_closes() {
    let d = TestDaemon::start_with(Options {
        client_timeout_secs: 1,
        ..Options::default()
    })
    .await;
    let addr = d.addr;
    let admin = d.jwt(TENANT, "roster:admin");
    let cases = [
        ("OPTIONS", "/api/v1/roster/users".to_owned(), &admin, "405"),
        ("POST", "/api/v1/roster/nope".to_owned(), &admin, "404"),
        ("DELETE", "/api/v1/roster/users".to_owned(), &admin, "405"),
        (
            "PUT",
            format!("/scim/v2/{TENANT}/ServiceProviderConfig"),
            &d.token,
            "405",
        ),
        ("POST", format!("/scim/v2/{TENANT}/Nope"), &d.token, "404"),
    ];
    for (method, path, token, status) in cases {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        );
        let answer = stall(&d, head, "{\"a\"", false).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{method} {path}: {answer}"
        );
        assert!(
            answer.to_lowercase().contains("\r\nconnection: close\r\n"),
            "{method} {path}: {answer}"
        );
        if status == "405" {
            assert!(
                answer.to_lowercase().contains("\r\nallow: "),
                "{method} {path}: {answer}"
            );
        }
    }
    // Without a body, the same refusals keep the connection for the next request.
    let r = d.delete("/ServiceProviderConfig").await;
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("connection"), None);
}

#[tokio::test]
async fn clients_that_stall_are_dropped_and_slow_ones_are_served() {
    let d = TestDaemon::start_with(Options {
        client_timeout_secs: 1,
        ..Options::default()
    })
    .await;
    let addr = d.addr;
    let post = |path: &str, auth: &str, len: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };

    // Mid-body, on SCIM: a SCIM error with 408, and the connection closes.
    let answer = stall(
        &d,
        post(&format!("/scim/v2/{TENANT}/Users"), &d.token, 200),
        "{\"schemas\"",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("application/scim+json"), "{answer}");
    assert!(
        answer.contains("urn:ietf:params:scim:api:messages:2.0:Error")
            && answer.contains("\"status\":\"408\""),
        "{answer}"
    );

    // Mid-body, on the Roster API: its JSON problem.
    let admin = d.jwt(TENANT, "roster:admin");
    let answer = stall(
        &d,
        post("/api/v1/roster/archetype:bulk-assign", &admin, 200),
        "{\"assignments\"",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");

    // Mid-headers: closed without an answer (there is no request to answer yet).
    let answer = stall(
        &d,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n"),
        "",
        false,
    )
    .await;
    assert_eq!(answer, "");

    // An idle keep-alive connection is closed too, after its request was answered.
    let answer = stall(
        &d,
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        "",
        false,
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
        "{answer}"
    );

    // A client that shuts its sending side after the request still gets the answer.
    let body = serde_json::to_string(&user("halfclosed@example.com")).unwrap();
    let answer = stall(
        &d,
        post(&format!("/scim/v2/{TENANT}/Users"), &d.token, body.len()),
        &body,
        true,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");

    // Slow is not stalled: a body trickling in over two seconds, a piece every 200 ms,
    // is read whole.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_string(&user("slow@example.com")).unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(post(&format!("/scim/v2/{TENANT}/Users"), &d.token, body.len()).as_bytes())
        .await
        .unwrap();
    let pieces: Vec<&[u8]> = body.as_bytes().chunks(body.len().div_ceil(10)).collect();
    for piece in pieces {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        conn.write_all(piece).await.unwrap();
    }
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

/// A GET ignores a body, and answered with a small one unread, the connection was closed
/// with `connection: close` while the client still sent it: the reset that followed cut
/// off answers (python-requests lost 2 of 10 with 5 bytes). It is read to the end first,
/// so the answer is whole and the connection serves the next request. A large one is
/// still left unread, and the connection closed.
#[tokio::test]
async fn a_get_with_a_small_body_keeps_its_connection() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let d = TestDaemon::start().await;
    let id = d.create_user("body@example.com").await;
    let conn = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let mut conn = BufReader::new(conn);
    let path = format!("/scim/v2/{TENANT}/Users/{id}");
    // The head of one answer.
    async fn head_of(conn: &mut BufReader<tokio::net::TcpStream>) -> String {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(
                conn.read_line(&mut line).await.unwrap() > 0,
                "closed: {head}"
            );
            if line == "\r\n" {
                return head;
            }
            head.push_str(&line);
        }
    }
    // The head of one answer, and its body read by its length.
    async fn answer(conn: &mut BufReader<tokio::net::TcpStream>) -> (String, String) {
        let head = head_of(conn).await;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await.unwrap();
        (head, String::from_utf8(body).unwrap())
    }
    for body in ["{}", &"x".repeat(20_000)] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: rosterd\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            d.token,
            body.len()
        );
        conn.get_mut().write_all(req.as_bytes()).await.unwrap();
        let (head, text) = answer(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_lowercase().contains("connection: close"), "{head}");
        assert!(text.contains("body@example.com"), "{text}");
    }
    // The same connection still answers, a HEAD with a body too.
    let req = format!(
        "HEAD {path} HTTP/1.1\r\nHost: rosterd\r\nAuthorization: Bearer {}\r\nContent-Length: 2\r\n\r\n{{}}",
        d.token
    );
    conn.get_mut().write_all(req.as_bytes()).await.unwrap();
    let head = head_of(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_lowercase().contains("connection: close"), "{head}");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: rosterd\r\nAuthorization: Bearer {}\r\n\r\n",
        d.token
    );
    conn.get_mut().write_all(req.as_bytes()).await.unwrap();
    assert!(answer(&mut conn).await.0.starts_with("HTTP/1.1 200"));

    // Past 1 MiB the body stays unread and the connection closes; so does it for a
    // client without a token that announces a body and does not send it, refused on
    // its headers all the same, and not as a stall, even where the client timeout is
    // as short as the second the drain may take.
    let quick = TestDaemon::start_with(Options {
        client_timeout_secs: 1,
        ..Options::default()
    })
    .await;
    for (d, token, len, want) in [
        (&d, d.token.as_str(), 1_100_000, "HTTP/1.1 200"),
        (&d, "not-the-token", 10, "HTTP/1.1 401"),
        (&quick, "not-the-token", 10, "HTTP/1.1 401"),
    ] {
        let mut conn = tokio::net::TcpStream::connect(d.addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: rosterd\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\n\r\n{{"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            conn.read_to_end(&mut out),
        )
        .await
        .expect("the connection was kept open")
        .unwrap();
        let out = String::from_utf8_lossy(&out).to_lowercase();
        assert!(out.starts_with(&want.to_lowercase()), "{out}");
        assert!(out.contains("connection: close"), "{out}");
    }
}
