#![no_main]
//! POST/PUT /scim/v2/{tenant}/Users and /Groups bodies: normalize_input, one_primary_each,
//! check_document_size, check_immutable against a stored doc, projection.
//! Invariant (unless FUZZ_NO_INV): normalize_input is idempotent on its own output.
use libfuzzer_sys::fuzz_target;
use rosterd::scim::ResourceKind;
use rosterd::scim::resource::{
    check_document_size, check_immutable, normalize_input, one_primary_each, primaries_of, project,
};
use serde_json::{Value, json};
use std::sync::OnceLock;

fn inv() -> bool {
    static I: OnceLock<bool> = OnceLock::new();
    *I.get_or_init(|| std::env::var_os("FUZZ_NO_INV").is_none())
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for kind in [ResourceKind::User, ResourceKind::Group] {
        let Ok(n) = normalize_input(kind, body.clone()) else {
            continue;
        };
        let doc = n.resource;
        let _ = primaries_of(&doc);
        if one_primary_each(&doc).is_err() {
            continue;
        }
        let _ = check_document_size(&doc, None);
        let old = json!({"id": "1", "userName": "u", "displayName": "G"});
        let _ = check_immutable(kind, &old, &doc);
        let _ = project(kind, &doc, &[], &[]);
        if inv() {
            match normalize_input(kind, doc.clone()) {
                Ok(again) => assert_eq!(again.resource, doc, "normalize_input is not idempotent"),
                Err(e) => panic!("normalized {kind:?} does not normalize again: {e:?}\n{doc}"),
            }
        }
    }
});
