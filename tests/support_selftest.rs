#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tests of the test-support servers in `tests/support/`: the OneRoster server enforces the
//! reference's rules and its faults behave as documented; the webhook receiver verifies
//! Standard Webhooks signatures.

#[path = "support/oneroster.rs"]
mod oneroster;
#[path = "support/webhook.rs"]
mod webhook;

use oneroster::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_ORG, DEFAULT_TOKEN, Fault, Kind,
    OneRosterOptions, OneRosterServer,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use webhook::{WebhookOptions, WebhookServer};

const T: Duration = Duration::from_secs(5);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn user(id: &str) -> Value {
    json!({
        "sourcedId": id,
        "status": "active",
        "dateLastModified": "2026-01-15T00:00:00.000Z",
        "enabledUser": "true",
        "givenName": "Alice",
        "familyName": "Smith",
        "email": format!("{id}@school.edu"),
        "roles": [{"roleType": "primary", "role": "student", "org": {"sourcedId": DEFAULT_ORG}}],
    })
}

fn course(id: &str) -> Value {
    json!({
        "sourcedId": id, "status": "active", "dateLastModified": "2026-01-15T00:00:00.000Z",
        "title": "Math Grade 5", "courseCode": "MATH-G5", "org": {"sourcedId": DEFAULT_ORG},
    })
}

fn class(id: &str, course: &str) -> Value {
    json!({
        "sourcedId": id, "status": "active", "dateLastModified": "2026-01-15T00:00:00.000Z",
        "title": "Math Grade 5 - Section 1", "course": {"sourcedId": course},
        "org": {"sourcedId": DEFAULT_ORG}, "classType": "scheduled", "terms": [],
    })
}

fn enrollment(id: &str, user: &str, class: &str) -> Value {
    json!({
        "sourcedId": id, "status": "active", "dateLastModified": "2026-01-15T00:00:00.000Z",
        "user": {"sourcedId": user}, "class": {"sourcedId": class}, "role": "student",
    })
}

struct Api {
    srv: OneRosterServer,
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn start() -> Api {
        Api {
            srv: OneRosterServer::start(OneRosterOptions::default()).await,
            http: client(),
            token: DEFAULT_TOKEN.to_string(),
        }
    }

    async fn put(&self, kind: Kind, id: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .put(self.srv.url(&format!("{}/{id}", kind.collection())))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn put_wrapped(&self, kind: Kind, obj: Value) -> (StatusCode, Value) {
        let id = obj["sourcedId"].as_str().unwrap().to_string();
        self.put(kind, &id, json!({ kind.singular(): obj })).await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.srv.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    async fn delete(&self, kind: Kind, id: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .delete(self.srv.url(&format!("{}/{id}", kind.collection())))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn assert_imsx(body: &Value) {
    assert_eq!(body["imsx_codeMajor"], "failure", "{body}");
    assert_eq!(body["imsx_severity"], "error", "{body}");
    assert!(body["imsx_description"].is_string(), "{body}");
}

#[tokio::test]
async fn put_requires_wrapped_body_and_answers_created_then_updated() {
    let api = Api::start().await;
    let (st, body) = api.put(Kind::User, "u1", user("u1")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_imsx(&body);
    assert!(api.srv.user("u1").is_none());

    let (st, body) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body, json!({"status": "created", "sourcedId": "u1"}));
    let (st, body) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["status"], "updated");
    assert_eq!(api.srv.stored(Kind::User, "u1").unwrap().writes, 2);

    let r = api.get("users/u1").await;
    assert_eq!(r.status(), StatusCode::OK);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["user"]["givenName"], "Alice");
    assert_eq!(got["user"]["dateLastModified"], "2026-01-15T00:00:00.000Z");
    assert_eq!(
        api.get("users/nobody").await.status(),
        StatusCode::NOT_FOUND
    );

    // Not JSON content type.
    let r = api
        .http
        .put(api.srv.url("users/u1"))
        .bearer_auth(&api.token)
        .body(json!({"user": user("u1")}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Orgs are read-only.
    let (st, _) = api
        .put_wrapped(Kind::Org, json!({"sourcedId": DEFAULT_ORG}))
        .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    let r = api.get("orgs").await;
    let orgs: Value = r.json().await.unwrap();
    assert_eq!(orgs["orgs"][0]["sourcedId"], DEFAULT_ORG);
}

#[tokio::test]
async fn path_body_mismatch_and_field_rules() {
    let api = Api::start().await;
    let (st, body) = api.put(Kind::User, "u1", json!({"user": user("u2")})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        body["imsx_description"]
            .as_str()
            .unwrap()
            .contains("does not match")
    );

    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut u = user("u1");
    u["enabledUser"] = json!(true);
    cases.push((u, "enabledUser as a JSON bool"));
    let mut u = user("u1");
    u.as_object_mut().unwrap().remove("familyName");
    cases.push((u, "missing familyName"));
    let mut u = user("u1");
    u["roles"] = json!([]);
    cases.push((u, "empty roles"));
    let mut u = user("u1");
    u["roles"][0]["role"] = json!("administrator");
    cases.push((u, "1.1 role"));
    let mut u = user("u1");
    u["dateLastModified"] = json!("yesterday");
    cases.push((u, "bad date"));
    let mut u = user("u1");
    u["status"] = json!("inactive");
    cases.push((u, "bad status"));
    for (u, what) in cases {
        let (st, body) = api.put_wrapped(Kind::User, u).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_imsx(&body);
    }

    let (st, _) = api.put_wrapped(Kind::Course, course("c1")).await;
    assert_eq!(st, StatusCode::CREATED);
    let mut k = class("k1", "c1");
    k["classType"] = json!("lecture");
    assert_eq!(
        api.put_wrapped(Kind::Class, k).await.0,
        StatusCode::BAD_REQUEST
    );
    let (st, _) = api.put_wrapped(Kind::Class, class("k1", "c1")).await;
    assert_eq!(st, StatusCode::CREATED);
    api.put_wrapped(Kind::User, user("u1")).await;
    let mut e = enrollment("e1", "u1", "k1");
    e["role"] = json!("aide");
    assert_eq!(
        api.put_wrapped(Kind::Enrollment, e).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn references_must_exist() {
    let api = Api::start().await;
    let mut u = user("u1");
    u["roles"][0]["org"]["sourcedId"] = json!("no-such-org");
    let (st, body) = api.put_wrapped(Kind::User, u).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_imsx(&body);

    let (st, _) = api.put_wrapped(Kind::Class, class("k1", "c1")).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    api.put_wrapped(Kind::Course, course("c1")).await;
    let (st, _) = api.put_wrapped(Kind::Class, class("k1", "c1")).await;
    assert_eq!(st, StatusCode::CREATED);

    let (st, _) = api
        .put_wrapped(Kind::Enrollment, enrollment("e1", "u1", "k1"))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    api.put_wrapped(Kind::User, user("u1")).await;
    let (st, _) = api
        .put_wrapped(Kind::Enrollment, enrollment("e1", "u1", "k1"))
        .await;
    assert_eq!(st, StatusCode::CREATED);

    // A soft-deleted user cannot be enrolled actively.
    assert_eq!(api.delete(Kind::User, "u1").await.0, StatusCode::NO_CONTENT);
    let (st, _) = api
        .put_wrapped(Kind::Enrollment, enrollment("e2", "u1", "k1"))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn course_delete_with_active_enrollments_is_409() {
    let api = Api::start().await;
    api.put_wrapped(Kind::Course, course("c1")).await;
    api.put_wrapped(Kind::Class, class("k1", "c1")).await;
    api.put_wrapped(Kind::User, user("u1")).await;
    api.put_wrapped(Kind::Enrollment, enrollment("e1", "u1", "k1"))
        .await;
    let (st, body) = api.delete(Kind::Course, "c1").await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(
        body,
        json!({"error": "Cannot delete course with active enrollments"})
    );
    assert_eq!(
        api.delete(Kind::Enrollment, "e1").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.srv.enrollments()["e1"]["status"], "tobedeleted");
    assert_eq!(
        api.delete(Kind::Course, "c1").await.0,
        StatusCode::NO_CONTENT
    );
    let got: Value = api.get("courses/c1").await.json().await.unwrap();
    assert_eq!(got["course"]["status"], "tobedeleted");
    // Idempotent; missing → 404.
    assert_eq!(
        api.delete(Kind::Course, "c1").await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete(Kind::Course, "c9").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn objects_owned_by_another_client_are_403() {
    let api = Api::start().await;
    api.put_wrapped(Kind::User, user("u1")).await;
    api.put_wrapped(Kind::Course, course("c1")).await;
    api.put_wrapped(Kind::Class, class("k1", "c1")).await;
    assert!(api.srv.set_owner_other(Kind::User, "u1"));
    let (st, body) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_imsx(&body);
    assert_eq!(api.delete(Kind::User, "u1").await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.srv.user("u1").unwrap()["status"], "active");
    // A class is protected through its course.
    api.srv.set_owner_other(Kind::Course, "c1");
    assert_eq!(api.delete(Kind::Class, "k1").await.0, StatusCode::FORBIDDEN);
    api.srv.clear_owner(Kind::Course, "c1");
    assert_eq!(
        api.delete(Kind::Class, "k1").await.0,
        StatusCode::NO_CONTENT
    );
}

async fn fetch_token(
    http: &reqwest::Client,
    srv: &OneRosterServer,
    secret: &str,
) -> reqwest::Response {
    http.post(&srv.token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id={DEFAULT_CLIENT_ID}&client_secret={secret}&scope=roster.createput"
        ))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn oauth_client_credentials_and_revocation() {
    let srv = OneRosterServer::start(OneRosterOptions {
        static_token: None,
        ..Default::default()
    })
    .await;
    let http = client();
    let users = srv.url("users");
    assert_eq!(
        http.get(&users).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        fetch_token(&http, &srv, "wrong").await.status(),
        StatusCode::UNAUTHORIZED
    );

    let r = fetch_token(&http, &srv, DEFAULT_CLIENT_SECRET).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tok: Value = r.json().await.unwrap();
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["expires_in"], 3600);
    assert_eq!(tok["scope"], "roster.createput");
    let token = tok["access_token"].as_str().unwrap().to_string();
    let r = http.get(&users).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    srv.revoke_tokens();
    let r = http.get(&users).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_imsx(&r.json().await.unwrap());

    // client_secret_basic works too.
    let r = http
        .post(&srv.token_url)
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token: Value = r.json().await.unwrap();
    let r = http
        .get(&users)
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(srv.tokens_issued(), 2);
    assert_eq!(srv.count_requests("POST", "token"), 3);
}

#[tokio::test]
async fn issued_tokens_expire() {
    let srv = OneRosterServer::start(OneRosterOptions {
        static_token: None,
        // Long enough for the first request on a loaded machine.
        token_ttl: Duration::from_millis(1000),
        ..Default::default()
    })
    .await;
    let http = client();
    let tok: Value = fetch_token(&http, &srv, DEFAULT_CLIENT_SECRET)
        .await
        .json()
        .await
        .unwrap();
    let token = tok["access_token"].as_str().unwrap();
    let users = srv.url("users");
    let ok = http.get(&users).bearer_auth(token).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = http.get(&users).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn status_faults_with_retry_after_and_path_filter() {
    let api = Api::start().await;
    api.srv.inject(
        Fault::status(503, 2)
            .with_retry_after("2")
            .on_path("/users"),
    );
    // Other paths are not affected.
    assert_eq!(api.get("courses").await.status(), StatusCode::OK);
    for _ in 0..2 {
        let r = api.get("users").await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_imsx(&r.json().await.unwrap());
    }
    assert_eq!(api.get("users").await.status(), StatusCode::OK);

    api.srv.inject(Fault::rate_limited(1, "1").on_method("PUT"));
    assert_eq!(api.get("users").await.status(), StatusCode::OK);
    let (st, _) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        api.srv.user("u1").is_none(),
        "a faulted write is not applied"
    );
    let (st, _) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::CREATED);

    api.srv.inject(Fault::status(500, 1).forever());
    assert_eq!(
        api.get("users").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        api.get("users").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    api.srv.clear_faults();
    assert_eq!(api.get("users").await.status(), StatusCode::OK);
    assert_eq!(api.srv.count_status(503), 2);
    assert_eq!(api.srv.count_status(429), 1);
    let faulted: Vec<_> = api
        .srv
        .requests()
        .into_iter()
        .filter(|r| r.fault.is_some())
        .collect();
    assert_eq!(faulted.len(), 5);
}

#[tokio::test]
async fn delay_fault_exceeds_client_timeout_but_applies_the_write() {
    let api = Api::start().await;
    api.srv
        .inject(Fault::delay(Duration::from_secs(3), 1).on_path("/users/"));
    // Time for the server to apply the write, on a loaded machine, before the client
    // gives up.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let err = http
        .put(api.srv.url("users/u1"))
        .bearer_auth(DEFAULT_TOKEN)
        .json(&json!({"user": user("u1")}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(api.srv.user("u1").is_some());
    // The retry sees an update.
    let (st, _) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn a_held_answer_waits_for_its_release() {
    let api = Api::start().await;
    api.srv.inject(Fault::held(1).on_path("/users/"));
    let put = {
        let (http, url) = (api.http.clone(), api.srv.url("users/u1"));
        tokio::spawn(async move {
            http.put(url)
                .bearer_auth(DEFAULT_TOKEN)
                .json(&json!({"user": user("u1")}))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    // Processed, but not answered.
    while api.srv.user("u1").is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!put.is_finished(), "the answer was not held");
    api.srv.release_held();
    assert_eq!(put.await.unwrap().unwrap(), StatusCode::CREATED);
}

#[tokio::test]
async fn drop_fault_closes_the_connection_without_answer() {
    let api = Api::start().await;
    api.srv.inject(Fault::drop_connection(2).on_path("/users"));
    for _ in 0..2 {
        let err = api
            .http
            .put(api.srv.url("users/u1"))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"user": user("u1")}))
            .send()
            .await
            .unwrap_err();
        assert!(!err.is_timeout(), "{err:?}");
        assert!(err.status().is_none(), "{err:?}");
        assert!(err.is_request() || err.is_connect(), "{err:?}");
    }
    assert!(api.srv.user("u1").is_none());
    let (st, _) = api.put_wrapped(Kind::User, user("u1")).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(api.srv.count_status(0), 2);
    assert_eq!(api.srv.faults_applied(), 2);
}

#[tokio::test]
async fn lists_page_and_filter() {
    let api = Api::start().await;
    for i in 0..25 {
        let mut u = user(&format!("u{i:02}"));
        u["dateLastModified"] = json!(format!("2026-01-{:02}T00:00:00.000Z", i + 1));
        if i % 5 == 0 {
            u["status"] = json!("tobedeleted");
        }
        assert_eq!(api.put_wrapped(Kind::User, u).await.0, StatusCode::CREATED);
    }
    let r = api.get("users?limit=10&offset=20").await;
    assert_eq!(r.headers()["x-total-count"], "25");
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["total"], 25);
    assert_eq!(page["offset"], 20);
    assert_eq!(page["limit"], 10);
    assert_eq!(page["users"].as_array().unwrap().len(), 5);
    assert_eq!(page["users"][0]["sourcedId"], "u20");

    let r = api
        .get("users?filter=status%3D'active'%20AND%20dateLastModified%3E'2026-01-20T00:00:00Z'")
        .await;
    let page: Value = r.json().await.unwrap();
    let ids: Vec<&str> = page["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["sourcedId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["u21", "u22", "u23", "u24"]);

    let page: Value = api
        .get("users?filter=role='student'&limit=5000&sort=sourcedId&orderBy=desc")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["limit"], 1000);
    assert_eq!(page["users"][0]["sourcedId"], "u24");
    assert_eq!(
        api.get("users?filter=status%20'active'").await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn tamper_remove_and_wait_until() {
    let api = Api::start().await;
    api.put_wrapped(Kind::User, user("u1")).await;
    assert!(
        api.srv
            .tamper_user("u1", |u| u["givenName"] = json!("Mallory"))
    );
    let u = api.srv.user("u1").unwrap();
    assert_eq!(u["givenName"], "Mallory");
    assert_ne!(u["dateLastModified"], "2026-01-15T00:00:00.000Z");
    assert!(api.srv.remove(Kind::User, "u1"));
    assert_eq!(api.get("users/u1").await.status(), StatusCode::NOT_FOUND);

    let srv = &api.srv;
    let (ok, _) = tokio::join!(srv.wait_until(|s| s.count(Kind::User) == 3, T), async {
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            api.put_wrapped(Kind::User, user(&format!("w{i}"))).await;
        }
    });
    assert!(ok);
    assert!(
        !srv.wait_until(|s| s.count(Kind::User) == 4, Duration::from_millis(100))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sustains_concurrent_writes() {
    let srv = OneRosterServer::start(OneRosterOptions {
        log_bodies: false,
        log_capacity: 100,
        ..Default::default()
    })
    .await;
    let http = client();
    let n = 4000;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32 {
        let http = http.clone();
        let url = srv.base_url.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(32) {
                let id = format!("user-{i}");
                let r = http
                    .put(format!("{url}/users/{id}"))
                    .bearer_auth(DEFAULT_TOKEN)
                    .json(&json!({"user": user(&id)}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(srv.count(Kind::User), n);
    assert_eq!(srv.count_requests("PUT", "users"), n as u64);
    assert_eq!(srv.requests().len(), 100);
    // Throughput is for information only: a loaded machine must not fail the test.
    eprintln!("{n} concurrent PUTs at {rate:.0}/s (debug build)");
}

// ---- webhook ----

async fn post_hook(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> reqwest::Response {
    let mut req = http.post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req.body(body.to_vec()).send().await.unwrap()
}

#[tokio::test]
async fn webhook_signatures_are_verified() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    assert!(hook.secret.starts_with("whsec_"));
    let http = client();
    let body = br#"{"type":"user.created","data":{"id":"u1"}}"#;
    let now = chrono::Utc::now().timestamp();

    let headers = webhook::signed_headers(&hook.secret, "msg_1", now, body);
    let r = post_hook(&http, &hook.url, &headers, body).await;
    assert_eq!(r.status(), StatusCode::OK);

    // Several signatures, one of which is valid (rotation), plus an unknown version.
    let other = webhook::new_secret();
    let sigs = format!(
        "v1a,AAAA {} {}",
        webhook::sign(&other, "msg_2", now, body),
        webhook::sign(&hook.secret, "msg_2", now, body)
    );
    let headers = [
        ("webhook-id", "msg_2".to_string()),
        ("webhook-timestamp", now.to_string()),
        ("webhook-signature", sigs),
    ];
    assert_eq!(
        post_hook(&http, &hook.url, &headers, body).await.status(),
        StatusCode::OK
    );

    // Wrong secret, tampered body, missing signature → 401.
    let headers = webhook::signed_headers(&other, "msg_3", now, body);
    assert_eq!(
        post_hook(&http, &hook.url, &headers, body).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let headers = webhook::signed_headers(&hook.secret, "msg_3", now, body);
    assert_eq!(
        post_hook(&http, &hook.url, &headers, br#"{"type":"evil"}"#)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post_hook(&http, &hook.url, &headers[..2], body)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // Signed but 10 minutes old → 400.
    let old = now - 600;
    let headers = webhook::signed_headers(&hook.secret, "msg_4", old, body);
    assert_eq!(
        post_hook(&http, &hook.url, &headers, body).await.status(),
        StatusCode::BAD_REQUEST
    );

    assert_eq!(hook.rejected(), 4);
    let got = hook.wait_for(2, T).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id, "msg_1");
    assert_eq!(got[0].body["data"]["id"], "u1");
    assert_eq!(got[0].attempt, 1);
    assert_eq!(
        hook.unique_ids().into_iter().collect::<Vec<_>>(),
        ["msg_1", "msg_2"]
    );
}

#[tokio::test]
async fn webhook_faults_and_attempt_counts() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    let http = client();
    let body = br#"{"n":1}"#;
    let now = chrono::Utc::now().timestamp();
    let headers = webhook::signed_headers(&hook.secret, "msg_1", now, body);

    hook.inject(webhook::Fault::status(503, 2).with_retry_after("3"));
    for _ in 0..2 {
        let r = post_hook(&http, &hook.url, &headers, body).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "3");
    }
    assert_eq!(
        post_hook(&http, &hook.url, &headers, body).await.status(),
        StatusCode::OK
    );
    assert_eq!(hook.attempt_count("msg_1"), 3);
    let got = hook.wait_for(1, T).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attempt, 3);
    assert_eq!(hook.attempts().len(), 3);

    hook.inject(webhook::Fault::gone(1));
    let headers = webhook::signed_headers(&hook.secret, "msg_2", now, body);
    assert_eq!(
        post_hook(&http, &hook.url, &headers, body).await.status(),
        StatusCode::GONE
    );

    hook.inject(webhook::Fault::drop_connection(1));
    let err = http
        .post(&hook.url)
        .header("webhook-id", "msg_3")
        .header("webhook-timestamp", now.to_string())
        .header(
            "webhook-signature",
            webhook::sign(&hook.secret, "msg_3", now, body),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap_err();
    assert!(err.status().is_none() && !err.is_timeout(), "{err:?}");
    assert_eq!(hook.delivery_count(), 1);
    assert_eq!(hook.rejected(), 0);
}

#[tokio::test]
async fn webhook_hold_answers_on_release_and_ticks_order_arrivals_and_answers() {
    let hook = WebhookServer::start(WebhookOptions::default()).await;
    let http = client();
    let now = chrono::Utc::now().timestamp();
    let held = br#"{"type":"a","n":1}"#;
    let free = br#"{"type":"b","n":1}"#;
    // Only the body with both needles is held.
    hook.inject(
        webhook::Fault::hold(1)
            .on_body(r#""type":"a""#)
            .on_body(r#""n":1"#),
    );
    let first = {
        let (http, url) = (http.clone(), hook.url.clone());
        let headers = webhook::signed_headers(&hook.secret, "msg_held", now, held);
        tokio::spawn(async move { post_hook(&http, &url, &headers, held).await.status() })
    };
    assert!(hook.wait_until(|h| h.attempts().len() == 1, T).await);
    let headers = webhook::signed_headers(&hook.secret, "msg_free", now, free);
    assert_eq!(
        post_hook(&http, &hook.url, &headers, free).await.status(),
        StatusCode::OK
    );
    let got = hook.attempts();
    assert_eq!(got[0].answered, None, "held until released");
    assert!(got[1].tick > got[0].tick);
    assert!(got[1].answered.unwrap() > got[1].tick);
    hook.release();
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    let got = hook.attempts();
    assert!(got[0].answered.unwrap() > got[1].answered.unwrap());
    // The fault was used up: the same body now goes through at once.
    let headers = webhook::signed_headers(&hook.secret, "msg_again", now, held);
    assert_eq!(
        post_hook(&http, &hook.url, &headers, held).await.status(),
        StatusCode::OK
    );
    assert_eq!(hook.delivery_count(), 3);
}

/// A request to 127.0.0.1 reaches the server listening there, whatever proxy the
/// environment names: every test talks to its servers on loopback through a default
/// reqwest client, which sends to the proxy of HTTP_PROXY or ALL_PROXY (a CI machine's
/// way to its package registries) whatever NO_PROXY does not name. `.cargo/config.toml`
/// sets NO_PROXY for what cargo runs; without it this test fails first, and says why.
#[tokio::test]
async fn loopback_requests_go_direct_whatever_proxy_the_environment_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf).await;
        let answer =
            "HTTP/1.1 204 No Content\r\nx-answered-by: the-test\r\nconnection: close\r\n\r\n";
        conn.write_all(answer.as_bytes()).await.unwrap();
    });
    let proxies: Vec<String> = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|val| format!("{v}={val}")))
        .collect();
    let why = format!(
        "a request to {addr} went to a proxy ({proxies:?}) that NO_PROXY ({:?}) does not keep \
         loopback from; run the tests through cargo, whose .cargo/config.toml sets NO_PROXY",
        std::env::var("NO_PROXY")
            .or_else(|_| std::env::var("no_proxy"))
            .ok()
    );
    let resp = client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{why}: {e}"));
    assert_eq!(
        resp.headers()
            .get("x-answered-by")
            .map(|v| v.to_str().unwrap()),
        Some("the-test"),
        "{why}"
    );
}
