//! SCIM filter and attribute-path grammar (RFC 7644 §3.4.2.2, §3.5.2) and evaluation
//! against stored resources.
use crate::scim::error::{ScimError, ScimResult};
use crate::scim::schema::ResourceKind;
use serde_json::Value;

/// `[urn ":"] attr ["." sub]`. Names keep the case the client sent; all matching is
/// case-insensitive.
#[derive(Debug, Clone, PartialEq)]
pub struct AttrPath {
    /// Schema URN when the client qualified the name, e.g.
    /// `urn:ietf:params:scim:schemas:extension:enterprise:2.0:User`.
    pub urn: Option<String>,
    pub attr: String,
    pub sub: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `attrPath op compValue`; value is a JSON string, number, bool or null.
    Compare {
        path: AttrPath,
        op: CompareOp,
        value: Value,
    },
    /// `attrPath pr`
    Present(AttrPath),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    /// `attrPath "[" valFilter "]"`: `filter` is evaluated against each element of the
    /// multi-valued attribute `path` (its AttrPath names in `filter` are sub-attributes).
    ValuePath {
        path: AttrPath,
        filter: Box<Filter>,
    },
}

/// A PATCH `path` (RFC 7644 §3.5.2): `attrPath` or `valuePath ["." subAttr]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchPath {
    pub attr: AttrPath,
    /// The `[...]` value filter, if any.
    pub filter: Option<Filter>,
    /// Sub-attribute after the value filter: `emails[type eq "work"].value`.
    pub sub_after_filter: Option<String>,
}

/// Parse a filter expression. Errors are `invalidFilter`.
pub fn parse_filter(input: &str) -> ScimResult<Filter> {
    let _ = input;
    Err(ScimError::invalid_filter("not yet implemented"))
}

/// Parse a PATCH path. Errors are `invalidPath`.
pub fn parse_path(input: &str) -> ScimResult<PatchPath> {
    let _ = input;
    Err(ScimError::invalid_path("not yet implemented"))
}

impl Filter {
    /// Does `resource` (a stored SCIM resource of `kind`) match?
    pub fn matches(&self, kind: ResourceKind, resource: &Value) -> bool {
        let _ = (kind, resource);
        false
    }
}
pub fn parse_attr_list(_s: &str) -> ScimResult<Vec<AttrPath>> {
    Ok(vec![])
}
impl Filter {
    pub fn attr_paths(&self) -> Vec<&AttrPath> {
        vec![]
    }
}
