//! SCIM 2.0 as a protocol (RFC 7643, RFC 7644): resource schemas, input normalization,
//! filters, PATCH and the error schema. Pure: no HTTP, no storage, so every rule here is
//! unit-tested without a server.
pub mod error;
pub mod filter;
pub mod names;
pub mod patch;
pub mod resource;
pub mod schema;

pub use error::{ScimError, ScimResult, ScimType};
pub use schema::ResourceKind;

/// Whether a user is active: one without `active` is (RFC 7643 leaves it to the service
/// provider), so a PUT that leaves it out after a deactivation reactivates.
pub fn is_active(doc: &serde_json::Value) -> bool {
    doc.get("active") != Some(&serde_json::Value::Bool(false))
}

/// Whether a client's name begins with `urn:` (any case) and goes on: a schema URN or an
/// attribute qualified by one. Read by `get`, as byte 4 of an accented name falls inside
/// a character, and cutting it there panicked.
pub(crate) fn urn_prefixed(name: &str) -> bool {
    name.len() > 4
        && name
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("urn:"))
}
