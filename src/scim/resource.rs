//! TEMPORARY stand-in, replaced by the schema helper's module.
use crate::scim::error::ScimResult;
use crate::scim::filter::AttrPath;
use crate::scim::schema::ResourceKind;
use serde_json::Value;
pub struct Normalized {
    pub resource: Value,
    pub ignored: Vec<String>,
}
pub fn normalize_input(_kind: ResourceKind, body: Value) -> ScimResult<Normalized> {
    Ok(Normalized {
        resource: body,
        ignored: vec![],
    })
}
pub fn check_immutable(_kind: ResourceKind, _old: &Value, _new: &Value) -> ScimResult<()> {
    Ok(())
}
pub fn project(_kind: ResourceKind, r: &Value, _a: &[AttrPath], _e: &[AttrPath]) -> Value {
    r.clone()
}
