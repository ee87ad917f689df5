#![no_main]
//! SCIM `filter` query parameter (GET /scim/v2/{tenant}/Users?filter=..., /.search):
//! parse, evaluate against a User and a Group, and check the Display round trip
//! parse(print(parse(x))) == parse(x).
use libfuzzer_sys::fuzz_target;
use rosterd::scim::ResourceKind;
use rosterd::scim::filter::{Filter, parse_filter};
use serde_json::{Value, json};
use std::sync::OnceLock;

fn docs() -> &'static (Value, Value) {
    static D: OnceLock<(Value, Value)> = OnceLock::new();
    D.get_or_init(|| {
        (
            serde_json::from_str(include_str!("../fixtures/user.json")).expect("user fixture"),
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                "id": "e9e30dba-f08f-4109-8486-d5c6a331660a",
                "displayName": "Tour Guides",
                "externalId": "g-1",
                "members": [{"value": "2819c223-7f76-453a-919d-413861904646", "type": "User", "display": "Babs"}],
                "meta": {"resourceType": "Group", "created": "2010-01-23T04:56:22Z"}
            }),
        )
    })
}

/// Equal, except that a float may come back one ULP off (serde_json without
/// `float_roundtrip` does not parse its own shortest float output exactly).
fn same(a: &Filter, b: &Filter) -> bool {
    use Filter::*;
    match (a, b) {
        (
            Compare {
                path: p,
                op: o,
                value: v,
            },
            Compare {
                path: q,
                op: r,
                value: w,
            },
        ) => {
            p == q
                && o == r
                && (v == w
                    || match (v.as_f64(), w.as_f64()) {
                        (Some(x), Some(y)) if v.is_f64() || w.is_f64() => {
                            (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
                        }
                        _ => false,
                    })
        }
        (And(a1, a2), And(b1, b2)) | (Or(a1, a2), Or(b1, b2)) => same(a1, b1) && same(a2, b2),
        (Not(x), Not(y)) => same(x, y),
        (ValuePath { path: p, filter: x }, ValuePath { path: q, filter: y }) => {
            p == q && same(x, y)
        }
        (x, y) => x == y,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(f) = parse_filter(s) else { return };
    let (user, group) = docs();
    let _ = f.matches(ResourceKind::User, user);
    let _ = f.matches(ResourceKind::Group, group);
    let _ = f.unknown_attr(&|p| p.attr.len() % 2 == 0);
    let _ = f.comparisons();
    let _ = f.attr_paths();
    // Round trip through Display.
    let printed = f.to_string();
    match parse_filter(&printed) {
        Ok(g) => assert!(
            same(&f, &g),
            "round trip changed the filter: {s:?} printed as {printed:?}"
        ),
        Err(e) => panic!("printed filter does not parse: {s:?} printed as {printed:?}: {e:?}"),
    }
});
