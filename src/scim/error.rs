//! The SCIM error (RFC 7644 §3.12): one type, rendered by the HTTP layer.
use serde_json::{Value, json};

pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// `scimType` values of RFC 7644 §3.12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScimType {
    InvalidFilter,
    TooMany,
    Uniqueness,
    Mutability,
    InvalidSyntax,
    InvalidPath,
    NoTarget,
    InvalidValue,
    InvalidVers,
    Sensitive,
}

impl ScimType {
    pub fn as_str(self) -> &'static str {
        match self {
            ScimType::InvalidFilter => "invalidFilter",
            ScimType::TooMany => "tooMany",
            ScimType::Uniqueness => "uniqueness",
            ScimType::Mutability => "mutability",
            ScimType::InvalidSyntax => "invalidSyntax",
            ScimType::InvalidPath => "invalidPath",
            ScimType::NoTarget => "noTarget",
            ScimType::InvalidValue => "invalidValue",
            ScimType::InvalidVers => "invalidVers",
            ScimType::Sensitive => "sensitive",
        }
    }
}

/// A SCIM protocol error: an HTTP status, an optional `scimType` and a human detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {detail}")]
pub struct ScimError {
    pub status: u16,
    pub scim_type: Option<ScimType>,
    pub detail: String,
}

impl ScimError {
    pub fn new(status: u16, scim_type: Option<ScimType>, detail: impl Into<String>) -> Self {
        ScimError {
            status,
            scim_type,
            detail: detail.into(),
        }
    }
    fn bad(t: ScimType, detail: impl Into<String>) -> Self {
        Self::new(400, Some(t), detail)
    }
    pub fn invalid_filter(d: impl Into<String>) -> Self {
        Self::bad(ScimType::InvalidFilter, d)
    }
    pub fn invalid_path(d: impl Into<String>) -> Self {
        Self::bad(ScimType::InvalidPath, d)
    }
    pub fn invalid_value(d: impl Into<String>) -> Self {
        Self::bad(ScimType::InvalidValue, d)
    }
    pub fn invalid_syntax(d: impl Into<String>) -> Self {
        Self::bad(ScimType::InvalidSyntax, d)
    }
    pub fn mutability(d: impl Into<String>) -> Self {
        Self::bad(ScimType::Mutability, d)
    }
    pub fn no_target(d: impl Into<String>) -> Self {
        Self::bad(ScimType::NoTarget, d)
    }
    pub fn too_many(d: impl Into<String>) -> Self {
        Self::bad(ScimType::TooMany, d)
    }
    pub fn invalid_vers(d: impl Into<String>) -> Self {
        Self::bad(ScimType::InvalidVers, d)
    }
    pub fn uniqueness(d: impl Into<String>) -> Self {
        Self::new(409, Some(ScimType::Uniqueness), d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(404, None, d)
    }
    pub fn precondition_failed(d: impl Into<String>) -> Self {
        Self::new(412, None, d)
    }
    pub fn not_implemented(d: impl Into<String>) -> Self {
        Self::new(501, None, d)
    }

    /// The error as the SCIM error JSON body.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "schemas": [ERROR_SCHEMA],
            "status": self.status.to_string(),
            // Details quote what the client sent: a 60,000-byte value came back whole,
            // in a /Bulk answer once per operation.
            "detail": crate::text::clip(&self.detail, crate::text::MAX_MESSAGE_BYTES),
        });
        if let Some(t) = self.scim_type {
            v["scimType"] = json!(t.as_str());
        }
        v
    }
}

pub type ScimResult<T> = Result<T, ScimError>;
