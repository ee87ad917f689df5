#![no_main]
//! PATCH /scim/v2/{tenant}/Users/{id} and /Groups/{id}: the body goes through the same
//! steps as server::scim::op_patch (parse_patch_request, split_member_ops for groups,
//! apply to the stored document, normalize_input, settle_primaries, merge_repeats,
//! check_immutable, check_document_size) and then projection of the answer.
//! A bare JSON array is wrapped as {"schemas": [PatchOp], "Operations": array}.
//! Invariant (unless FUZZ_NO_INV is set): what the PATCH stores normalizes again, so the
//! next PATCH of the resource is not refused because of the stored document itself.
use libfuzzer_sys::fuzz_target;
use rosterd::scim::ResourceKind;
use rosterd::scim::patch::{PATCH_OP_SCHEMA, apply, parse_patch_request, split_member_ops};
use rosterd::scim::resource::{
    check_document_size, check_immutable, merge_repeats, normalize_input, project, settle_primaries,
};
use serde_json::{Value, json};
use std::sync::OnceLock;

fn stored() -> &'static (Value, Value) {
    static D: OnceLock<(Value, Value)> = OnceLock::new();
    D.get_or_init(|| {
        // RFC 7643's example user, as the filter target evaluates against.
        let user: Value =
            serde_json::from_str(include_str!("../fixtures/user.json")).expect("user fixture");
        let group = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": "Tour Guides",
            "externalId": "g-1"
        });
        let mut u = normalize_input(ResourceKind::User, user)
            .expect("user seed")
            .resource;
        let mut g = normalize_input(ResourceKind::Group, group)
            .expect("group seed")
            .resource;
        // What the store adds.
        u["id"] = json!("2819c223-7f76-453a-919d-413861904646");
        u["meta"] = json!({"resourceType": "User", "created": "2010-01-23T04:56:22Z",
                           "lastModified": "2011-05-13T04:42:34Z", "version": "W/\"1\""});
        g["id"] = json!("e9e30dba-f08f-4109-8486-d5c6a331660a");
        g["meta"] = json!({"resourceType": "Group", "created": "2024-01-01T00:00:00Z"});
        (u, g)
    })
}

fn inv() -> bool {
    static I: OnceLock<bool> = OnceLock::new();
    *I.get_or_init(|| std::env::var_os("FUZZ_NO_INV").is_none())
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let body = match body {
        Value::Array(a) => json!({"schemas": [PATCH_OP_SCHEMA], "Operations": a}),
        b => b,
    };
    let Ok(ops) = parse_patch_request(body) else {
        return;
    };
    let (user, group) = stored();
    for (kind, old) in [(ResourceKind::User, user), (ResourceKind::Group, group)] {
        let doc_ops = if kind == ResourceKind::Group {
            match split_member_ops(ops.clone()) {
                Ok(split) => split.doc_ops,
                Err(_) => continue,
            }
        } else {
            ops.clone()
        };
        let mut doc = old.clone();
        if apply(kind, &mut doc, &doc_ops).is_err() {
            continue;
        }
        let Ok(n) = normalize_input(kind, doc) else {
            continue;
        };
        let mut doc = n.resource;
        if let Some(o) = doc.as_object_mut() {
            o.remove("password");
        }
        settle_primaries(kind, old, &mut doc);
        merge_repeats(kind, &mut doc, old);
        if let Some(o) = doc.as_object_mut() {
            o.remove("members");
            o.remove("groups");
        }
        if check_immutable(kind, old, &doc).is_err()
            || check_document_size(&doc, Some(old)).is_err()
        {
            continue;
        }
        let _ = project(kind, &doc, &[], &[]);
        if inv() {
            if let Err(e) = normalize_input(kind, doc.clone()) {
                panic!("stored {kind:?} document no longer normalizes: {e:?}\n{doc}");
            }
        }
    }
});
