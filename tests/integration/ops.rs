//! The operator's surface in-process: /status and /readyz contents, bundle reload on
//! SIGHUP.

use crate::harness::{OTHER_TENANT, TENANT, TestDaemon, patch_op};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn status_counts_each_tenant_and_readyz_answers() {
    let d = TestDaemon::start().await;
    let a = d.create_user("a@acme.test").await;
    d.create_user("b@acme.test").await;
    d.create_group("Ops").await;
    d.patch(
        &format!("/Users/{a}"),
        patch_op(json!([{"op": "replace", "value": {"active": false}}])),
    )
    .await;
    let r = d.raw(Method::GET, &d.url("/readyz"), None, &[], None).await;
    assert_eq!(r.status, 200);
    let s = d
        .raw(Method::GET, &d.url("/status"), None, &[], None)
        .await
        .body;
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].as_i64().unwrap() >= 0);
    assert!(s["store"]["size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["draining"], false);
    let t = &s["tenants"][TENANT];
    assert_eq!(t["users"], 2, "{s}");
    assert_eq!(t["active_users"], 1, "{s}");
    assert_eq!(t["groups"], 1, "{s}");
    assert!(t["review_queue"].is_u64());
    assert!(t["last_seq"].as_u64().unwrap() >= 4);
    assert_eq!(s["tenants"][OTHER_TENANT]["users"], 0);
    // Nothing personal: no userName in the document.
    assert!(!s.to_string().contains("a@acme.test"));
}

#[tokio::test]
async fn sighup_reloads_a_changed_bundle_and_reclassifies() {
    let d = TestDaemon::start().await;
    d.create_user("dev@acme.test").await;
    let reader = d.jwt(TENANT, "roster:read");
    let r = d.roster(Method::GET, "/archetypes", &reader, None).await;
    assert_eq!(r.body["bundle_version"], "test-1");
    let bundle = d.root.join("bundle.toml");
    let text = std::fs::read_to_string(&bundle).unwrap();
    std::fs::write(
        &bundle,
        text.replace("version = \"test-1\"", "version = \"test-2\""),
    )
    .unwrap();
    d.reload().await;
    let r = d.roster(Method::GET, "/archetypes", &reader, None).await;
    assert_eq!(r.body["bundle_version"], "test-2", "{}", r.body);
    // A broken bundle is refused and the working one stays.
    std::fs::write(&bundle, "version = ").unwrap();
    d.reload().await;
    let r = d.roster(Method::GET, "/archetypes", &reader, None).await;
    assert_eq!(r.body["bundle_version"], "test-2", "{}", r.body);
}
