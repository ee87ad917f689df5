#![no_main]
//! PATCH `path` strings and the `attributes` / `excludedAttributes` / `sortBy` lists,
//! then the projection of a User/Group with the parsed lists.
use libfuzzer_sys::fuzz_target;
use rosterd::scim::ResourceKind;
use rosterd::scim::filter::{parse_attr_list, parse_path};
use rosterd::scim::resource::project;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = parse_path(s) {
        let user = json!({"userName": "a", "emails": [{"value": "x@y", "type": "work"}]});
        if let Some(f) = &p.filter {
            let _ = f.matches_element(ResourceKind::User, &p.attr, &user["emails"][0]);
            let _ = f.to_string();
        }
        let _ = p.attr.to_string();
    }
    // Split on a NUL: first part `attributes`, second `excludedAttributes`.
    let mut parts = s.splitn(2, '\0');
    let a = parts.next().unwrap_or("");
    let e = parts.next().unwrap_or("");
    let (Ok(a), Ok(e)) = (parse_attr_list(a), parse_attr_list(e)) else {
        return;
    };
    let user = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "id": "1", "userName": "u", "name": {"givenName": "g", "familyName": "f"},
        "emails": [{"value": "x@y", "type": "work", "primary": true}],
        "password": "p",
        "meta": {"resourceType": "User"},
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "d",
            "manager": {"value": "m"}}
    });
    let group = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "id": "g",
        "displayName": "G", "members": [{"value": "1", "type": "User"}]});
    let _ = project(ResourceKind::User, &user, &a, &e);
    let _ = project(ResourceKind::Group, &group, &a, &e);
});
