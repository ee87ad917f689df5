//! SCIM schemas (RFC 7643 §4, §8.7.1) as static data: the single source for attribute
//! semantics (type, caseExact, mutability, returned) used by filters, PATCH, validation,
//! projection and the /Schemas endpoint.

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_USER_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrKind {
    String,
    Boolean,
    Decimal,
    Integer,
    DateTime,
    Binary,
    Reference,
    Complex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutability {
    ReadOnly,
    ReadWrite,
    Immutable,
    WriteOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    Always,
    Never,
    Default,
    Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uniqueness {
    None,
    Server,
    Global,
}

/// One attribute definition. Sub-attributes are only present on `Complex` attributes.
#[derive(Debug)]
pub struct AttrDef {
    pub name: &'static str,
    pub kind: AttrKind,
    pub multi_valued: bool,
    pub description: &'static str,
    pub required: bool,
    pub case_exact: bool,
    pub mutability: Mutability,
    pub returned: Returned,
    pub uniqueness: Uniqueness,
    pub canonical_values: &'static [&'static str],
    pub reference_types: &'static [&'static str],
    pub sub_attributes: &'static [AttrDef],
}

#[derive(Debug)]
pub struct SchemaDef {
    pub id: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    pub attributes: &'static [AttrDef],
}

/// The two resource types rosterd serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    User,
    Group,
}

/// Resolve an attribute: `urn` is the schema URN if the path was URN-qualified (any case),
/// `attr` the top-level attribute name and `sub` the sub-attribute, all matched
/// case-insensitively. A core-schema URN resolves against the core schema of `kind`.
/// Returns the definition of the innermost named attribute (the sub-attribute if given).
pub fn lookup(
    kind: ResourceKind,
    urn: Option<&str>,
    attr: &str,
    sub: Option<&str>,
) -> Option<&'static AttrDef> {
    let schema = schema_for(kind, urn)?;
    let top = schema
        .attributes
        .iter()
        .find(|a| a.name.eq_ignore_ascii_case(attr))?;
    match sub {
        None => Some(top),
        Some(s) => top
            .sub_attributes
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(s)),
    }
}

/// The schema a (possibly absent) URN names for a resource kind.
pub fn schema_for(kind: ResourceKind, urn: Option<&str>) -> Option<&'static SchemaDef> {
    match (kind, urn) {
        (ResourceKind::User, None) => Some(&USER),
        (ResourceKind::Group, None) => Some(&GROUP),
        (ResourceKind::User, Some(u)) if u.eq_ignore_ascii_case(USER_SCHEMA) => Some(&USER),
        (ResourceKind::User, Some(u)) if u.eq_ignore_ascii_case(ENTERPRISE_USER_SCHEMA) => {
            Some(&ENTERPRISE_USER)
        }
        (ResourceKind::Group, Some(u)) if u.eq_ignore_ascii_case(GROUP_SCHEMA) => Some(&GROUP),
        _ => None,
    }
}

const fn simple(name: &'static str, kind: AttrKind) -> AttrDef {
    AttrDef {
        name,
        kind,
        multi_valued: false,
        description: "",
        required: false,
        case_exact: false,
        mutability: Mutability::ReadWrite,
        returned: Returned::Default,
        uniqueness: Uniqueness::None,
        canonical_values: &[],
        reference_types: &[],
        sub_attributes: &[],
    }
}

// PLACEHOLDER definitions: the schema helper replaces these with the full RFC 7643 §8.7.1
// attribute lists (every core User attribute, enterprise extension, Group).
pub static USER: SchemaDef = SchemaDef {
    id: USER_SCHEMA,
    name: "User",
    description: "User Account",
    attributes: &[
        AttrDef {
            uniqueness: Uniqueness::Server,
            required: true,
            ..simple("userName", AttrKind::String)
        },
        simple("displayName", AttrKind::String),
        simple("active", AttrKind::Boolean),
    ],
};

pub static ENTERPRISE_USER: SchemaDef = SchemaDef {
    id: ENTERPRISE_USER_SCHEMA,
    name: "EnterpriseUser",
    description: "Enterprise User",
    attributes: &[
        simple("employeeNumber", AttrKind::String),
        simple("department", AttrKind::String),
    ],
};

pub static GROUP: SchemaDef = SchemaDef {
    id: GROUP_SCHEMA,
    name: "Group",
    description: "Group",
    attributes: &[AttrDef {
        required: true,
        ..simple("displayName", AttrKind::String)
    }],
};
pub fn schema_json(_def: &SchemaDef, _base: &str) -> serde_json::Value {
    serde_json::Value::Null
}
