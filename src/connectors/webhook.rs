//! The webhook connector: every change becomes one or more events
//! (`roster.user_created`, …) with the object's snapshot, signed per the Standard
//! Webhooks specification. The message id is derived from tenant, sequence number and
//! event type, so a retried or replayed delivery carries the same `webhook-id` and
//! receivers can drop the repeat.
//!
//! The events of one change share its `data.seq`, which is what receivers order by, so
//! they go out one at a time in a fixed order: the object's own event, then the
//! assignment's, each once the one before it was acknowledged.

use base64::Engine;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Plan;
use super::http::Request;
use crate::store::{AssignmentSource, ChangeEvent, ChangeOp};

pub const EVENT_TYPES: [&str; 9] = [
    "roster.user_created",
    "roster.user_updated",
    "roster.user_deactivated",
    "roster.user_reactivated",
    "roster.user_deleted",
    "roster.archetype_assigned",
    "roster.archetype_overridden",
    "roster.group_created",
    "roster.group_updated",
];
const GROUP_DELETED: &str = "roster.group_deleted";

/// `[webhook]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// Environment variable holding the signing secret, `whsec_<base64>`.
    pub secret_env: String,
    /// During a secret rotation: a variable holding the next (or previous) secret.
    /// Every message is then signed with both, so receivers can switch at their pace.
    #[serde(default)]
    pub rotation_secret_env: Option<String>,
    /// Event types to send; empty sends all.
    #[serde(default)]
    pub events: Vec<String>,
}

impl WebhookSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        super::http::check_url("url", &self.url, false)?;
        crate::config::check_env_name("secret_env", &self.secret_env)?;
        if let Some(var) = &self.rotation_secret_env {
            crate::config::check_env_name("rotation_secret_env", var)?;
        }
        for e in &self.events {
            if !EVENT_TYPES.contains(&e.as_str()) && e != GROUP_DELETED {
                return Err(format!(
                    "key `events`: unknown event type {e:?}; known: {}, {GROUP_DELETED}",
                    EVENT_TYPES.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn wants(&self, t: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == t)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {} is not set", crate::config::shown_env_name(.0))]
    Unset(String),
    #[error(
        "the secret in {} is not whsec_<base64> of 24 to 64 bytes",
        crate::config::shown_env_name(.0)
    )]
    Malformed(String),
}

/// How `whsec_…` is decoded: the Standard Webhooks libraries (standardwebhooks, svix)
/// take the base64 with or without its `=` padding, so a receiver's secret generated
/// unpadded must work here too.
const SECRET_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Signing keys, decoded from `whsec_…`: the current one, and during a rotation a second.
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl Signer {
    pub fn from_env(
        settings: &WebhookSettings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Signer, SecretError> {
        let mut keys = Vec::new();
        for var in std::iter::once(&settings.secret_env).chain(&settings.rotation_secret_env) {
            let raw = env(var).ok_or_else(|| SecretError::Unset(var.clone()))?;
            let s = Signer::parse(&raw).ok_or_else(|| SecretError::Malformed(var.clone()))?;
            keys.extend(s.keys);
        }
        Ok(Signer { keys })
    }

    pub fn parse(secret: &str) -> Option<Signer> {
        let b64 = secret.trim().strip_prefix("whsec_")?;
        let key = SECRET_BASE64.decode(b64).ok()?;
        (24..=64)
            .contains(&key.len())
            .then(|| Signer { keys: vec![key] })
    }

    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per key, space-separated.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let sigs: Vec<String> = self
            .keys
            .iter()
            .map(|key| {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                format!(
                    "v1,{}",
                    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
                )
            })
            .collect();
        sigs.join(" ")
    }

    /// The headers of one attempt.
    pub fn headers(&self, id: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        let now = chrono::Utc::now().timestamp();
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", now.to_string()),
            ("webhook-signature", self.sign(id, now, body)),
        ]
    }
}

/// The event types one change produces, in the order they are delivered.
pub fn event_types(e: &ChangeEvent) -> Vec<&'static str> {
    let mut out = Vec::new();
    match (e.resource_type.as_str(), e.op) {
        ("User", ChangeOp::Created) => out.push("roster.user_created"),
        ("User", ChangeOp::Updated) if e.deactivated => out.push("roster.user_deactivated"),
        ("User", ChangeOp::Updated) if e.reactivated => out.push("roster.user_reactivated"),
        ("User", ChangeOp::Updated) => out.push("roster.user_updated"),
        ("User", ChangeOp::Deleted) => out.push("roster.user_deleted"),
        ("Group", ChangeOp::Created) => out.push("roster.group_created"),
        ("Group", ChangeOp::Updated) => out.push("roster.group_updated"),
        ("Group", ChangeOp::Deleted) => out.push(GROUP_DELETED),
        _ => {}
    }
    if let Some(a) = &e.assignment {
        out.push(if a.source == AssignmentSource::Override {
            "roster.archetype_overridden"
        } else {
            "roster.archetype_assigned"
        });
    }
    out
}

/// The messages for one change, filtered by the connector's event types: a stage each,
/// so that a receiver never sees the assignment of a change before the change itself.
///
/// A message's `webhook-id` is the same for the same change of the same store every time
/// it is sent (a retry, a restart, a replay), and differs between stores: `store` is the
/// store's id ([`crate::store::Store::id`]; empty for one from before stores had one,
/// whose ids stay as they were).
pub fn plan(
    settings: &WebhookSettings,
    (store, tenant): (&str, &str),
    e: &ChangeEvent,
    snapshot: Option<&Value>,
) -> Plan {
    let stages = event_types(e)
        .into_iter()
        .filter(|t| settings.wants(t))
        .map(|t| {
            let id = format!(
                "msg_{}",
                uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_URL,
                    if store.is_empty() {
                        format!("rosterd:{tenant}:{}:{t}", e.seq)
                    } else {
                        format!("rosterd:{store}/{tenant}:{}:{t}", e.seq)
                    }
                    .as_bytes()
                )
                .simple()
            );
            let body = json!({
                "type": t,
                "timestamp": e.at,
                "data": {
                    "tenant": tenant,
                    "seq": e.seq,
                    "resource_type": e.resource_type,
                    "id": e.id,
                    "object": snapshot,
                    "assignment": e.assignment.as_ref().map(crate::api::assignment_state),
                    "members_added": e.members_added,
                    "members_removed": e.members_removed,
                },
            });
            vec![Request {
                method: reqwest::Method::POST,
                url: settings.url.clone(),
                body: Some(body.to_string().into_bytes()),
                absent_ok: false,
                message_id: Some(id),
            }]
        })
        .collect();
    Plan {
        stages,
        hashes: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let s = Signer::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = s.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotation_signs_with_both_secrets() {
        let settings = WebhookSettings {
            url: "http://x".into(),
            secret_env: "NEW".into(),
            rotation_secret_env: Some("OLD".into()),
            events: vec![],
        };
        let env = |v: &str| match v {
            "NEW" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            "OLD" => Some(format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode([7u8; 32])
            )),
            _ => None,
        };
        let s = Signer::from_env(&settings, &env).unwrap();
        let sig = s.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(parts[1].starts_with("v1,") && parts[1] != parts[0]);
        let unset = WebhookSettings {
            rotation_secret_env: Some("GONE".into()),
            ..settings
        };
        assert!(
            matches!(Signer::from_env(&unset, &env), Err(SecretError::Unset(v)) if v == "GONE")
        );
    }

    #[test]
    fn a_secret_reads_the_same_with_or_without_its_padding() {
        // 32 bytes: base64 ends in one `=`.
        let padded = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([0xfbu8; 32])
        );
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=');
        let sign = |s: &str| Signer::parse(s).map(|s| s.sign("msg_1", 1614265330, b"{}"));
        assert!(sign(&padded).is_some());
        assert_eq!(sign(unpadded), sign(&padded));
        // Padding in the middle, or too much of it, is still not base64.
        assert!(sign(&format!("{unpadded}==")).is_none());
        assert!(sign(&format!("whsec_={}", &unpadded[6..])).is_none());
    }

    #[test]
    fn short_or_foreign_secrets_are_refused() {
        assert!(Signer::parse("whsec_c2hvcnQ=").is_none());
        assert!(Signer::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
    }

    /// A change of user `u` with nothing else set.
    fn user_change(seq: u64, op: ChangeOp) -> ChangeEvent {
        ChangeEvent::bare(seq, chrono::Utc::now(), "User", "u", op)
    }

    fn assignment(source: AssignmentSource) -> crate::store::Assignment {
        crate::store::Assignment {
            archetype_id: Some("a".into()),
            confidence: 0.9,
            assigned_by: "user:x".into(),
            assigned_at: chrono::Utc::now(),
            source,
            bundle_version: String::new(),
            candidates: vec![],
            needs_review: false,
        }
    }

    fn settings(events: &[&str]) -> WebhookSettings {
        WebhookSettings {
            url: "http://x".into(),
            secret_env: "S".into(),
            rotation_secret_env: None,
            events: events.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// A change's message id is the same every time it is planned, differs between
    /// stores (one rebuilt empty numbers from #1 again), and is the one it always was
    /// for a store from before stores had an id.
    #[test]
    fn a_message_id_is_the_stores_and_the_changes() {
        let settings = settings(&["roster.user_created"]);
        let e = user_change(1, ChangeOp::Created);
        let id = |store: &str| {
            plan(&settings, (store, "t"), &e, None).stages[0][0]
                .message_id
                .clone()
                .unwrap()
        };
        assert_eq!(id("store-a"), id("store-a"));
        assert_ne!(id("store-a"), id("store-b"));
        assert_ne!(id("store-a"), id(""));
        let before = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            b"rosterd:t:1:roster.user_created",
        );
        assert_eq!(id(""), format!("msg_{}", before.simple()));
    }

    #[test]
    fn deactivation_and_overrides_have_their_own_types() {
        let mut e = ChangeEvent {
            deactivated: true,
            ..user_change(4, ChangeOp::Updated)
        };
        assert_eq!(event_types(&e), ["roster.user_deactivated"]);
        e.op = ChangeOp::Archetype;
        e.deactivated = false;
        e.assignment = Some(assignment(AssignmentSource::Override));
        assert_eq!(event_types(&e), ["roster.archetype_overridden"]);
        let settings = settings(&["roster.user_created"]);
        assert!(plan(&settings, ("", "t"), &e, None).stages.is_empty());
    }

    #[test]
    fn reactivation_has_its_own_type_and_passes_the_filter() {
        let e = ChangeEvent {
            reactivated: true,
            deleting_user: false,
            ..user_change(5, ChangeOp::Updated)
        };
        assert_eq!(event_types(&e), ["roster.user_reactivated"]);
        let settings = settings(&["roster.user_reactivated"]);
        assert_eq!(settings.validate(), Ok(()));
        assert_eq!(plan(&settings, ("", "t"), &e, None).stages.len(), 1);
    }

    #[test]
    fn the_events_of_one_change_are_stages_user_event_first() {
        let e = ChangeEvent {
            assignment: Some(assignment(AssignmentSource::Classifier)),
            ..user_change(6, ChangeOp::Created)
        };
        let settings = settings(&[]);
        let types: Vec<Vec<String>> = plan(&settings, ("", "t"), &e, None)
            .stages
            .iter()
            .map(|stage| {
                stage
                    .iter()
                    .map(|r| {
                        let body: Value =
                            serde_json::from_slice(r.body.as_deref().unwrap()).unwrap();
                        body["type"].as_str().unwrap().to_owned()
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            types,
            [["roster.user_created"], ["roster.archetype_assigned"]]
        );
    }
}
