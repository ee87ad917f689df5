use crate::harness::*;
use serde_json::{Value, json};

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn seed(d: &TestDaemon) {
    let people = [
        ("ann@example.com", "Ann", "Sales", true, "E1"),
        ("ben@example.com", "Ben", "Sales", false, "E2"),
        ("cat@corp.test", "Cat", "Engineering", true, "E3"),
        ("dan@corp.test", "Dan", "Engineering", true, "E4"),
        ("eve@example.com", "Eve", "Legal", true, "E5"),
    ];
    for (u, given, dept, active, ext) in people {
        let body = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
            "userName": u,
            "externalId": ext,
            "name": {"givenName": given, "familyName": "Doe"},
            "emails": [{"value": u, "type": "work", "primary": true},
                       {"value": format!("home-{u}"), "type": "home"}],
            "active": active,
            ENTERPRISE: {"department": dept},
        });
        let r = d.post("/Users", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
}

async fn names(d: &TestDaemon, query: &str) -> Vec<String> {
    let r = d.get(&format!("/Users?{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    r.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userName"].as_str().unwrap().to_owned())
        .collect()
}

async fn filter(d: &TestDaemon, f: &str) -> Vec<String> {
    let mut v = names(d, &format!("filter={}", enc(f))).await;
    v.sort();
    v
}

#[tokio::test]
async fn filters_cover_the_grammar() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("userName eq \"ANN@example.com\"", vec!["ann@example.com"]),
        ("username Eq \"ann@example.com\"", vec!["ann@example.com"]),
        ("externalId eq \"E3\"", vec!["cat@corp.test"]),
        ("externalId eq \"e3\"", vec![]),
        (
            "emails.value eq \"home-dan@corp.test\"",
            vec!["dan@corp.test"],
        ),
        (
            "emails[type eq \"work\" and value co \"@corp.test\"]",
            vec!["cat@corp.test", "dan@corp.test"],
        ),
        (
            "emails[type eq \"home\"].value eq \"home-dan@corp.test\"",
            vec!["dan@corp.test"],
        ),
        (
            "emails[type eq \"work\"].value eq \"home-dan@corp.test\"",
            vec![],
        ),
        (
            "userName sw \"a\" or userName ew \"corp.test\"",
            vec!["ann@example.com", "cat@corp.test", "dan@corp.test"],
        ),
        ("active eq false", vec!["ben@example.com"]),
        ("not (active eq true)", vec!["ben@example.com"]),
        (
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq \"engineering\"",
            vec!["cat@corp.test", "dan@corp.test"],
        ),
        (
            "name.givenName eq \"eve\" or (userName co \"ben\" and active eq false)",
            vec!["ben@example.com", "eve@example.com"],
        ),
        ("title pr", vec![]),
        // A complex attribute without `value` is present when any part of it is.
        (
            "name pr and name.givenName eq \"eve\"",
            vec!["eve@example.com"],
        ),
        ("active eq \"False\"", vec!["ben@example.com"]),
        (
            "externalId pr and userName gt \"d\"",
            vec!["dan@corp.test", "eve@example.com"],
        ),
        (
            "meta.created gt \"2000-01-01T00:00:00Z\" and userName le \"b\"",
            vec!["ann@example.com"],
        ),
    ];
    for (f, want) in cases {
        assert_eq!(filter(&d, f).await, want, "filter {f}");
    }
}

/// A `value` that holds an id (a manager, a member, a user's group) compares as `id`
/// does, case and all (and so do a URL and a certificate), whether the filter is answered from an index (`manager.value eq`)
/// or term by term (the same filter `or` a term that matches nothing), and as a PATCH
/// removes a member by it.
#[tokio::test]
async fn ids_urls_and_binary_compare_case_and_all_however_the_filter_is_answered() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    let boss = d
        .get("/Users?filter=userName%20eq%20%22ann%40example.com%22")
        .await;
    let boss = boss.body["Resources"][0]["id"].as_str().unwrap().to_owned();
    let r = d
        .post(
            "/Users",
            json!({"userName": "rep@example.com", ENTERPRISE: {"manager": {"value": boss}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let rep = r.body["id"].as_str().unwrap().to_owned();
    let upper = boss.to_uppercase();
    assert_ne!(upper, boss, "a UUID with letters");
    for (f, want) in [
        (
            format!("manager.value eq \"{boss}\""),
            vec!["rep@example.com"],
        ),
        (format!("manager.value eq \"{upper}\""), vec![]),
        (
            format!("manager.value eq \"{upper}\" or title eq \"nobody\""),
            vec![],
        ),
        (format!("not (manager.value ne \"{upper}\")"), vec![]),
    ] {
        assert_eq!(filter(&d, &f).await, want, "filter {f}");
    }
    let g = d
        .post(
            "/Groups",
            json!({"displayName": "Reps", "members": [{"value": rep}]}),
        )
        .await;
    assert_eq!(g.status, 201, "{}", g.body);
    let gid = g.body["id"].as_str().unwrap().to_owned();
    let groups = |f: String| {
        let d = &d;
        async move {
            let r = d.get(&format!("/Groups?filter={}", enc(&f))).await;
            assert_eq!(r.status, 200, "{f}: {}", r.body);
            r.body["totalResults"].as_u64().unwrap()
        }
    };
    assert_eq!(groups(format!("members.value eq \"{rep}\"")).await, 1);
    assert_eq!(
        groups(format!("members.value eq \"{}\"", rep.to_uppercase())).await,
        0
    );
    assert_eq!(
        filter(&d, &format!("groups.value eq \"{}\"", gid.to_uppercase())).await,
        Vec::<String>::new()
    );
    assert_eq!(
        filter(&d, &format!("groups.value eq \"{gid}\"")).await,
        ["rep@example.com"]
    );
    // So do a URL and binary data (RFC 7643 §2.3.6-7), as de-duplication compares them.
    let r = d
        .post(
            "/Users",
            json!({"userName": "pic@example.com",
                   "photos": [{"value": "https://cdn.example/A.jpg", "type": "photo"}],
                   "x509Certificates": [{"value": "TUlJQ2Vn"}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    for (f, want) in [
        (
            "photos.value eq \"https://cdn.example/A.jpg\"",
            vec!["pic@example.com"],
        ),
        ("photos.value eq \"https://cdn.example/a.jpg\"", vec![]),
        (
            "x509Certificates.value eq \"TUlJQ2Vn\"",
            vec!["pic@example.com"],
        ),
        ("x509Certificates.value eq \"tulJQ2Vn\"", vec![]),
    ] {
        assert_eq!(filter(&d, f).await, want, "filter {f}");
    }
}

#[tokio::test]
async fn bad_filters_are_scim_errors() {
    let d = TestDaemon::start().await;
    for f in [
        "userName eq",
        "(userName eq \"a\"",
        "userName zz \"a\"",
        "emails[type eq \"work\"",
    ] {
        let r = d.get(&format!("/Users?filter={}", enc(f))).await;
        assert_eq!(r.status, 400, "{f}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidFilter", "{f}");
    }
    // An attribute no schema of the endpoint defines would match nothing, and an IdP
    // would take the empty list for "no such user".
    for (endpoint, f) in [
        ("/Users", "foo eq \"x\""),
        ("/Users", "userName eq \"a\" or emails.nope eq \"x\""),
        ("/Users", "urn:example:custom:2.0:User:badge eq \"7\""),
        ("/Groups", "userName eq \"a\""),
        ("/Groups", "department eq \"Sales\""),
        // Inside a value filter, names are the outer attribute's sub-attributes.
        ("/Users", "emails[foo eq \"work\"]"),
        ("/Users", "emails[type eq \"work\"].foo eq \"x\""),
        ("/Users", "emails[type eq \"work\" and foo pr]"),
        ("/Groups", "members[value eq \"x\" or bar pr]"),
        ("/Users", "emails[type.value eq \"x\"]"),
    ] {
        let r = d.get(&format!("{endpoint}?filter={}", enc(f))).await;
        assert_eq!(r.status, 400, "{endpoint} {f}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidFilter", "{f}");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("is not an attribute of"),
            "{}",
            r.body
        );
    }
    // A boolean has no order (RFC 7644 §3.4.2.2).
    for f in ["active gt false", "emails[primary ge true]"] {
        let r = d.get(&format!("/Users?filter={}", enc(f))).await;
        assert_eq!(r.status, 400, "{f}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidFilter", "{f}");
        assert!(
            r.body["detail"].as_str().unwrap().contains("has no order"),
            "{}",
            r.body
        );
    }
    // A value the attribute can never hold would match nothing as well.
    for (f, says) in [
        ("meta.created gt \"not a date\"", "dateTime"),
        ("meta.lastModified ge \"2026-12-03\"", "dateTime"),
        ("active eq \"maybe\"", "boolean"),
        ("emails[primary eq 1]", "boolean"),
        ("userName eq true", "string"),
        // A boolean has no substrings, a name no value of its own to compare, and a
        // location is not stored: each matched nothing with a 200.
        ("active sw true", "co, sw and ew do not apply"),
        ("name eq \"Alice\"", "compare one of its sub-attributes"),
        ("meta co \"x\"", "compare one of its sub-attributes"),
        ("meta.location pr", "filter on id instead"),
        (
            "userName pr and meta.location co \"Users\"",
            "filter on id instead",
        ),
    ] {
        let r = d.get(&format!("/Users?filter={}", enc(f))).await;
        assert_eq!(r.status, 400, "{f}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidFilter", "{f}");
        assert!(
            r.body["detail"].as_str().unwrap().contains(says),
            "{f}: {}",
            r.body
        );
    }
    // What the schemas define is taken, qualified or not, on both endpoints and across
    // both at the root's /.search.
    for (endpoint, f) in [
        ("/Users", "department eq \"Sales\""),
        ("/Users", "manager.value eq \"x\""),
        ("/Users", "groups.value eq \"x\""),
        (
            "/Users",
            "id eq \"x\" or meta.lastModified gt \"2000-01-01T00:00:00Z\"",
        ),
        ("/Groups", "members.value eq \"x\" or displayName eq \"x\""),
        ("/Groups", "members[value eq \"x\" and type eq \"User\"]"),
        (
            "/Users",
            "emails[type eq \"work\" and primary eq true].value pr",
        ),
        (
            "/Groups",
            "urn:ietf:params:scim:schemas:core:2.0:Group:displayName eq \"x\"",
        ),
    ] {
        let r = d.get(&format!("{endpoint}?filter={}", enc(f))).await;
        assert_eq!(r.status, 200, "{endpoint} {f}: {}", r.body);
    }
    let r = d
        .scim(
            reqwest::Method::POST,
            "/.search",
            Some(json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                "filter": "userName eq \"a\" or members.value eq \"b\"",
            })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A GET of the root with a filter queries both (RFC 7644 §3.4.2.1); it was 404.
    d.create_group("Ann's group").await;
    d.create_user("ann@example.com").await;
    for root in ["", "/"] {
        let f = enc("userName sw \"ann\" or displayName sw \"ann\"");
        let r = d.get(&format!("{root}?filter={f}")).await;
        assert_eq!(r.status, 200, "{root:?}: {}", r.body);
        assert_eq!(r.body["totalResults"], 2, "{}", r.body);
        let r = d.get(&format!("{root}?filter={}", enc("nosuch pr"))).await;
        assert_eq!(r.body["scimType"], "invalidFilter", "{}", r.body);
    }
}

#[tokio::test]
async fn paging_sorting_and_projection() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    assert_eq!(
        names(&d, "sortBy=userName&sortOrder=descending&count=2").await,
        vec!["eve@example.com", "dan@corp.test"]
    );
    let r = d.get("/Users?sortBy=userName&startIndex=3&count=2").await;
    assert_eq!(r.body["totalResults"], 5);
    assert_eq!(r.body["startIndex"], 3);
    assert_eq!(r.body["itemsPerPage"], 2);
    assert_eq!(r.body["Resources"][0]["userName"], "cat@corp.test");

    // Unsorted paging is stable and covers everyone exactly once.
    let mut seen = Vec::new();
    for start in [1, 3, 5] {
        seen.extend(names(&d, &format!("startIndex={start}&count=2")).await);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5);

    let r = d.get("/Users?count=0").await;
    assert_eq!(r.body["totalResults"], 5);
    assert_eq!(r.body["Resources"].as_array().map(Vec::len).unwrap_or(0), 0);

    let r = d.get("/Users?attributes=userName&count=1").await;
    let u = &r.body["Resources"][0];
    assert!(u.get("userName").is_some() && u.get("id").is_some(), "{u}");
    assert!(u.get("name").is_none() && u.get("emails").is_none(), "{u}");

    let r = d.get("/Users?excludedAttributes=emails,name&count=1").await;
    let u = &r.body["Resources"][0];
    assert!(u.get("emails").is_none() && u.get("name").is_none(), "{u}");
    assert!(u.get("userName").is_some());

    // A schema's URN alone names all of its attributes, the core's as an extension's.
    let core = "urn:ietf:params:scim:schemas:core:2.0:User";
    let r = d.get(&format!("/Users?attributes={core}&count=1")).await;
    let u = &r.body["Resources"][0];
    assert!(u["userName"].is_string() && u["emails"].is_array(), "{u}");
    assert!(
        u["name"]["givenName"].is_string() && u["meta"].is_object(),
        "{u}"
    );
    assert!(u.get(ENTERPRISE).is_none(), "{u}");
    let r = d
        .get(&format!("/Users?excludedAttributes={core}&count=1"))
        .await;
    let u = &r.body["Resources"][0];
    assert!(
        u.get("userName").is_none() && u.get("emails").is_none(),
        "{u}"
    );
    assert!(
        u["id"].is_string() && u[ENTERPRISE]["department"].is_string(),
        "{u}"
    );
    let r = d
        .get(&format!("/Users?attributes={ENTERPRISE}&count=1"))
        .await;
    let u = &r.body["Resources"][0];
    assert!(
        u.get("userName").is_none() && u[ENTERPRISE].is_object(),
        "{u}"
    );

    // A name with a multi-byte character across its fourth byte is refused as any bad
    // name is; cutting it there to look for "urn:" panicked (500). A sortBy no resource
    // holds, or with no one value to sort by, is said, not answered in id order.
    for (endpoint, query) in [
        ("/Users", "attributes=abc%C3%A9"),
        ("/Users", "excludedAttributes=abc%C3%A9"),
        ("/Users", "sortBy=abc%C3%A9"),
        ("/Users", "attributes=urn:x:%E2%80%80."),
        ("/Groups", "sortBy=nosuch"),
        ("/Groups", "sortBy=meta.location"),
        ("/Groups", "sortBy=department"),
        ("/Groups", "sortBy=members.value"),
        ("/Users", "sortBy=groups"),
        ("/Users", "sortBy=name"),
        ("/Users", "sortBy=password"),
    ] {
        let r = d.get(&format!("{endpoint}?{query}")).await;
        assert_eq!(
            (r.status.as_u16(), r.body["scimType"].as_str()),
            (400, Some("invalidValue")),
            "{query}: {}",
            r.body
        );
    }
    let search = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
        "attributes": ["abc\u{e9}"],
    });
    let r = d.post("/Users/.search", search).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = d.get("/Users?sortBy=department").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A single complex attribute sorts by its value, as manager.value does.
    let ext = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
    for (name, boss) in [("z@example.com", "a-boss"), ("y@example.com", "b-boss")] {
        d.post(
            "/Users",
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ext],
                   "userName": name, ext: {"manager": {"value": boss}}}),
        )
        .await;
    }
    for sort in ["manager", "manager.value"] {
        assert_eq!(
            names(&d, &format!("sortBy={sort}&count=2")).await,
            ["z@example.com", "y@example.com"],
            "{sort}"
        );
    }
}

/// Paging with neither filter nor sort takes its total from the store's counters and reads
/// only the page: it must still cover users then groups exactly once, end cleanly, and
/// follow deletes.
#[tokio::test]
async fn unfiltered_paging_spans_users_and_groups_and_follows_deletes() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    let gids = [d.create_group("Ops").await, d.create_group("Sales").await];
    let page = |start: usize| {
        let d = &d;
        async move {
            let body = json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                "startIndex": start,
                "count": 3,
            });
            let r = d.post("/.search", body).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body
        }
    };
    let mut kinds = Vec::new();
    let mut ids = Vec::new();
    for start in [1, 4, 7] {
        let body = page(start).await;
        assert_eq!(body["totalResults"], 7, "{body}");
        assert_eq!(body["startIndex"], start);
        for r in body["Resources"].as_array().unwrap() {
            kinds.push(if r.get("userName").is_some() {
                "User"
            } else {
                "Group"
            });
            ids.push(r["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        kinds,
        ["User"; 5]
            .iter()
            .chain(&["Group"; 2])
            .copied()
            .collect::<Vec<_>>()
    );
    assert_eq!(&ids[5..], {
        let mut g = gids.to_vec();
        g.sort();
        g
    });
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7);
    let past = page(8).await;
    assert_eq!(past["totalResults"], 7);
    assert_eq!(past["itemsPerPage"], 0);

    let r = d
        .delete(&format!("/Users/{}", ids_of_users(&d).await[0]))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(page(1).await["totalResults"], 6);
    let r = d.get("/Users?startIndex=4&count=10").await;
    assert_eq!(r.body["totalResults"], 4);
    assert_eq!(r.body["itemsPerPage"], 1);
    let r = d.get("/Groups?count=0").await;
    assert_eq!(r.body["totalResults"], 2);
}

#[tokio::test]
async fn paging_in_turn_stays_exact_when_users_come_and_go() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    // Each page resumes where the one before ended; a user created or deleted in between
    // must give exactly what counting from the first user gives.
    let page = |start: usize| {
        let d = &d;
        async move {
            let r = d.get(&format!("/Users?startIndex={start}&count=2")).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body["Resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let all = ids_of_users(&d).await;
    assert_eq!(page(1).await, all[0..2]);
    assert_eq!(page(3).await, all[2..4]);
    assert_eq!(page(5).await, all[4..5]);

    let r = d.delete(&format!("/Users/{}", all[0])).await;
    assert_eq!(r.status, 204);
    assert_eq!(page(3).await, all[3..5]);

    assert_eq!(page(1).await, all[1..3]);
    d.create_user("zed@corp.test").await;
    let now = ids_of_users(&d).await;
    assert_eq!(now.len(), 5);
    assert_eq!(page(3).await, now[2..4]);
    assert_eq!(page(5).await, now[4..5]);
}

async fn ids_of_users(d: &TestDaemon) -> Vec<String> {
    let r = d.get("/Users").await;
    r.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn search_endpoint_takes_a_body() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    let r = d
        .post(
            "/Users/.search",
            json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
                "filter": "userName ew \"example.com\"",
                "attributes": ["userName"],
                "sortBy": "userName",
                "startIndex": 1,
                "count": 10,
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got: Vec<&str> = r.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userName"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        vec!["ann@example.com", "ben@example.com", "eve@example.com"]
    );
    let r = d.post("/.search", json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"], "filter": "userName eq \"ann@example.com\" or displayName pr"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totalResults"], 1, "{}", r.body);
    let r = d
        .post("/Users/.search", json!({"filter": "userName pr"}))
        .await;
    assert_eq!(r.status, 400, "schemas are required: {}", r.body);
}

#[tokio::test]
async fn discovery_endpoints_describe_what_is_supported() {
    let d = TestDaemon::start().await;
    let spc = d.get("/ServiceProviderConfig").await;
    assert_eq!(spc.status, 200);
    for feature in ["patch", "bulk", "filter", "sort", "etag"] {
        assert_eq!(spc.body[feature]["supported"], true, "{feature}");
    }
    assert_eq!(spc.body["changePassword"]["supported"], false);
    assert_eq!(spc.body["pagination"]["cursor"], false, "{}", spc.body);
    assert_eq!(spc.body["pagination"]["index"], true);
    let rt = d.get("/ResourceTypes").await;
    let ids: Vec<&str> = rt.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["User", "Group"]);
    let schemas = d.get("/Schemas").await;
    let ids: Vec<&str> = schemas.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&ENTERPRISE), "{ids:?}");
    let user = d
        .get("/Schemas/urn:ietf:params:scim:schemas:core:2.0:User")
        .await;
    assert_eq!(user.status, 200);
    let attrs: &Vec<Value> = user.body["attributes"].as_array().unwrap();
    let user_name = attrs.iter().find(|a| a["name"] == "userName").unwrap();
    assert_eq!(user_name["uniqueness"], "server");
    assert_eq!(user_name["caseExact"], false);
    let pw = attrs.iter().find(|a| a["name"] == "password").unwrap();
    assert_eq!(pw["returned"], "never");
    // RFC 7644 §4: paging and sorting are ignored there, a filter is 403, so that the
    // whole list is not taken for the matches.
    for path in [
        "/ServiceProviderConfig",
        "/Schemas",
        "/ResourceTypes",
        "/ResourceTypes/User",
    ] {
        let r = d.get(&format!("{path}?filter=id%20eq%20%22User%22")).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert_eq!(r.body["status"], "403", "{path}");
        let r = d
            .get(&format!("{path}?startIndex=2&count=1&sortBy=id"))
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let r = d.get("/ResourceTypes?startIndex=2&count=1").await;
    assert_eq!(r.body["totalResults"], 2, "{}", r.body);
}

/// A parameter given twice, or a cursor rosterd does not offer, is refused rather than
/// half-read: an RFC 9865 client whose `cursor` was ignored got page one forever.
#[tokio::test]
async fn query_parameters_are_read_once_and_whole() {
    let d = TestDaemon::start().await;
    seed(&d).await;
    for q in [
        "filter=userName%20pr&filter=active%20eq%20false",
        "count=1&COUNT=2",
        "cursor=",
        "cursor=abc&count=2",
    ] {
        let r = d.get(&format!("/Users?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["scimType"], "invalidValue", "{q}");
    }
    let r = d.get("/Users?startIndex=2&count=2").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["itemsPerPage"], 2);
    assert_eq!(r.body["startIndex"], 2);
    // A list parameter repeated, as HTTP libraries send a list, is one list.
    let r = d
        .get("/Users?count=1&attributes=userName&ATTRIBUTES=externalId")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let first = &r.body["Resources"][0];
    assert!(
        first.get("userName").is_some() && first.get("externalId").is_some(),
        "{first}"
    );
    assert!(first.get("emails").is_none(), "{first}");
    // A cursor in a /.search body is refused as in a query.
    let r = d
        .post(
            "/Users/.search",
            json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"], "cursor": ""}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
}
