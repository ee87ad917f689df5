//! What the store's unit tests share: a policy with a predictable review queue, test
//! users, and re-opening a directory.

use super::{AssignmentSource, Decision, GroupRef, Resolver};
use serde_json::{Value, json};

/// Every user is assigned archetype "x"; those whose title is "unsure" get confidence 0.2
/// and land in the review queue.
pub(super) struct Doubtful;

impl Resolver for Doubtful {
    fn decide(&self, user: &Value, _groups: &[GroupRef]) -> Decision {
        let unsure = user["title"] == "unsure";
        Decision {
            archetype_id: Some("x".into()),
            confidence: if unsure { 0.2 } else { 0.95 },
            assigned_by: "service:classifier".into(),
            source: AssignmentSource::Classifier,
            bundle_version: "v".into(),
            candidates: vec![],
        }
    }
    fn review_threshold(&self) -> f64 {
        0.7
    }
    fn uses_groups(&self) -> bool {
        false
    }
    fn bundle_version(&self) -> &str {
        "v"
    }
    /// Every archetype but "retired", which a bundle has dropped.
    fn has_archetype(&self, id: &str) -> bool {
        id != "retired"
    }
}

pub(super) fn user(name: &str, title: &str, active: bool) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
           "userName": name, "title": title, "active": active})
}

/// Open a directory that a handle dropped a moment ago held. sled releases its file lock
/// only when its background threads let go of the database, shortly after the drop, so
/// an immediate re-open in the same process can find it still locked. (A restarted
/// daemon is a new process, whose lock the kernel released at the old one's exit.)
pub(crate) fn when_unlocked<T, E: std::fmt::Debug>(open: impl Fn() -> Result<T, E>) -> T {
    match past_the_lock(open) {
        Ok(v) => v,
        Err(e) => panic!("open: {e:?}"),
    }
}

pub(crate) use super::past_the_lock;

/// A runtime for a synchronous test to drive the store's async calls on.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Create a user of tenant "t" from its SCIM document; its id.
pub(crate) async fn create_user(store: &super::Store, doc: Value) -> String {
    store
        .create("t", crate::scim::ResourceKind::User, doc, vec![])
        .await
        .expect("create")
        .id
}

/// Give a user of tenant "t" a new title and `active` flag, the rest of their document
/// kept.
pub(crate) async fn set_user(store: &super::Store, id: &str, title: &'static str, active: bool) {
    store
        .update("t", crate::scim::ResourceKind::User, id, None, move |old| {
            let mut doc = old.clone();
            doc["title"] = json!(title);
            doc["active"] = json!(active);
            Ok(super::Update {
                doc,
                members: vec![],
            })
        })
        .await
        .expect("update");
}
