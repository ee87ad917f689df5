//! TEMPORARY stand-in, replaced by the PATCH engine.
use crate::scim::error::ScimResult;
use crate::scim::filter::{Filter, PatchPath};
use crate::scim::schema::ResourceKind;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOpKind {
    Add,
    Remove,
    Replace,
}
#[derive(Debug, Clone)]
pub struct PatchOp {
    pub op: PatchOpKind,
    pub path: Option<PatchPath>,
    pub value: Option<Value>,
}
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRef {
    pub value: String,
    pub kind: Option<String>,
    pub display: Option<String>,
}
#[derive(Debug, Clone)]
pub enum MemberOp {
    Add(Vec<MemberRef>),
    Remove(Vec<String>),
    RemoveAll,
    ReplaceAll(Vec<MemberRef>),
    RemoveMatching(Filter),
}
pub fn parse_patch_request(_body: &Value) -> ScimResult<Vec<PatchOp>> {
    Ok(vec![])
}
pub fn apply(_kind: ResourceKind, _r: &mut Value, _ops: &[PatchOp]) -> ScimResult<()> {
    Ok(())
}
pub fn split_member_ops(ops: Vec<PatchOp>) -> ScimResult<(Vec<MemberOp>, Vec<PatchOp>)> {
    Ok((vec![], ops))
}
