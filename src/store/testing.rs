//! What the store's unit tests share: a policy with a predictable review queue.

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
}

pub(super) fn user(name: &str, title: &str, active: bool) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
           "userName": name, "title": title, "active": active})
}
