//! SCIM schemas (RFC 7643 §4, §8.7.1) as static data: the single source for attribute
//! semantics (type, caseExact, mutability, returned) used by filters, PATCH, validation,
//! projection and the /Schemas endpoint.
//!
//! Everything is `'static` so that callers can hold `&'static AttrDef`s without lifetimes
//! or allocation, and so the published /Schemas document can never drift from the rules
//! the server actually enforces.

use serde_json::{Map, Value, json};

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_USER_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
/// The `schemas` value of every resource served from /Schemas (RFC 7643 §7).
pub const SCHEMA_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";

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

impl AttrKind {
    /// The RFC 7643 §7 `type` keyword; also handy in `invalidValue` error details.
    pub fn as_str(self) -> &'static str {
        match self {
            AttrKind::String => "string",
            AttrKind::Boolean => "boolean",
            AttrKind::Decimal => "decimal",
            AttrKind::Integer => "integer",
            AttrKind::DateTime => "dateTime",
            AttrKind::Binary => "binary",
            AttrKind::Reference => "reference",
            AttrKind::Complex => "complex",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutability {
    ReadOnly,
    ReadWrite,
    Immutable,
    WriteOnly,
}

impl Mutability {
    /// The RFC 7643 §7 `mutability` keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Mutability::ReadOnly => "readOnly",
            Mutability::ReadWrite => "readWrite",
            Mutability::Immutable => "immutable",
            Mutability::WriteOnly => "writeOnly",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    Always,
    Never,
    Default,
    Request,
}

impl Returned {
    /// The RFC 7643 §7 `returned` keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Returned::Always => "always",
            Returned::Never => "never",
            Returned::Default => "default",
            Returned::Request => "request",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uniqueness {
    None,
    Server,
    Global,
}

impl Uniqueness {
    /// The RFC 7643 §7 `uniqueness` keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Uniqueness::None => "none",
            Uniqueness::Server => "server",
            Uniqueness::Global => "global",
        }
    }
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

impl AttrDef {
    /// Whether it has a `value` sub-attribute (`manager`, `emails`), which stands for it
    /// in a comparison, a sort or a bare id sent for it.
    pub fn has_value_sub(&self) -> bool {
        self.sub_attributes
            .iter()
            .any(|s| s.name.eq_ignore_ascii_case("value"))
    }

    /// A complex attribute with no `value` of its own (`name`, `meta`): nothing to
    /// compare or sort it by, but its parts.
    pub fn is_valueless_complex(&self) -> bool {
        self.kind == AttrKind::Complex && !self.has_value_sub()
    }
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

impl ResourceKind {
    /// The resource type name used in `meta.resourceType` and /ResourceTypes.
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::User => "User",
            ResourceKind::Group => "Group",
        }
    }

    /// The collection path segment (RFC 7644 §3.2), without slashes.
    pub fn endpoint(self) -> &'static str {
        match self {
            ResourceKind::User => "Users",
            ResourceKind::Group => "Groups",
        }
    }
}

/// The core schema of a resource kind: the one unqualified attribute names resolve against.
pub fn core_schema(kind: ResourceKind) -> &'static SchemaDef {
    match kind {
        ResourceKind::User => &USER,
        ResourceKind::Group => &GROUP,
    }
}

static USER_SCHEMAS: [&SchemaDef; 2] = [&USER, &ENTERPRISE_USER];
static GROUP_SCHEMAS: [&SchemaDef; 1] = [&GROUP];

/// Every schema a resource of `kind` may carry, core schema first. Used for /Schemas,
/// /ResourceTypes (`schemaExtensions`) and for validating a resource's `schemas` list.
pub fn schemas_of(kind: ResourceKind) -> &'static [&'static SchemaDef] {
    match kind {
        ResourceKind::User => &USER_SCHEMAS,
        ResourceKind::Group => &GROUP_SCHEMAS,
    }
}

/// Resolve an attribute: `urn` is the schema URN if the path was URN-qualified (any case),
/// `attr` the top-level attribute name and `sub` the sub-attribute, all matched
/// case-insensitively. A core-schema URN resolves against the core schema of `kind`.
/// Returns the definition of the innermost named attribute (the sub-attribute if given).
///
/// Unqualified and core-qualified names also fall back to the common attributes
/// (`id`, `externalId`, `meta`): they are on every resource but belong to no schema, and
/// filters such as `meta.lastModified gt ...` must still see their types.
pub fn lookup(
    kind: ResourceKind,
    urn: Option<&str>,
    attr: &str,
    sub: Option<&str>,
) -> Option<&'static AttrDef> {
    let schema = schema_for(kind, urn)?;
    match find(schema.attributes, attr) {
        Some(top) => resolve_sub(top, sub),
        None if std::ptr::eq(schema, core_schema(kind)) => lookup_common(attr, sub),
        None => None,
    }
}

/// The extension an unqualified attribute name belongs to, when the core schema and the
/// common attributes do not have it and exactly one extension of `kind` does
/// (`department`, `manager`). RFC 7644 §3.10 says clients SHOULD qualify extension
/// attributes, not MUST; a provider that does not would otherwise see the attribute
/// ignored or refused although its meaning is plain.
pub fn extension_owning(kind: ResourceKind, attr: &str) -> Option<&'static SchemaDef> {
    if find(core_schema(kind).attributes, attr).is_some() || lookup_common(attr, None).is_some() {
        return None;
    }
    let mut owners = schemas_of(kind)
        .iter()
        .skip(1)
        .filter(|s| find(s.attributes, attr).is_some());
    match (owners.next(), owners.next()) {
        (Some(one), None) => Some(*one),
        _ => None,
    }
}

/// Resolve a common attribute (RFC 7643 §3.1), case-insensitively.
pub fn lookup_common(attr: &str, sub: Option<&str>) -> Option<&'static AttrDef> {
    resolve_sub(find(COMMON_ATTRIBUTES, attr)?, sub)
}

fn find(attrs: &'static [AttrDef], name: &str) -> Option<&'static AttrDef> {
    attrs.iter().find(|a| a.name.eq_ignore_ascii_case(name))
}

fn resolve_sub(top: &'static AttrDef, sub: Option<&str>) -> Option<&'static AttrDef> {
    match sub {
        None => Some(top),
        Some(s) => find(top.sub_attributes, s),
    }
}

/// The schema a (possibly absent) URN names for a resource kind.
pub fn schema_for(kind: ResourceKind, urn: Option<&str>) -> Option<&'static SchemaDef> {
    match urn {
        None => Some(core_schema(kind)),
        Some(u) => schemas_of(kind)
            .iter()
            .copied()
            .find(|s| s.id.eq_ignore_ascii_case(u)),
    }
}

/// RFC 7643 §7 representation of a schema, as served from `/Schemas/{id}`. `base` is the
/// service's base URL without a trailing slash. Common attributes are deliberately absent:
/// RFC 7643 §3.1 says they are not part of any schema.
pub fn schema_json(def: &SchemaDef, base: &str) -> Value {
    json!({
        "schemas": [SCHEMA_SCHEMA],
        "id": def.id,
        "name": def.name,
        "description": def.description,
        "attributes": def.attributes.iter().map(attr_json).collect::<Vec<_>>(),
        "meta": {
            "resourceType": "Schema",
            "location": format!("{base}/Schemas/{}", def.id),
        },
    })
}

/// One attribute in RFC 7643 §7 form. Optional lists are omitted when empty because
/// several clients treat `"canonicalValues": []` as "no value allowed".
fn attr_json(a: &AttrDef) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), a.name.into());
    m.insert("type".into(), a.kind.as_str().into());
    m.insert("multiValued".into(), a.multi_valued.into());
    m.insert("description".into(), a.description.into());
    m.insert("required".into(), a.required.into());
    m.insert("caseExact".into(), a.case_exact.into());
    m.insert("mutability".into(), a.mutability.as_str().into());
    m.insert("returned".into(), a.returned.as_str().into());
    m.insert("uniqueness".into(), a.uniqueness.as_str().into());
    if !a.canonical_values.is_empty() {
        m.insert("canonicalValues".into(), a.canonical_values.into());
    }
    if !a.reference_types.is_empty() {
        m.insert("referenceTypes".into(), a.reference_types.into());
    }
    if !a.sub_attributes.is_empty() {
        let subs = a.sub_attributes.iter().map(attr_json).collect::<Vec<_>>();
        m.insert("subAttributes".into(), subs.into());
    }
    Value::Object(m)
}

// ---------------------------------------------------------------------------------------
// Definitions. Everything starts from `base` (the RFC 7643 §2.2 defaults) and overrides
// only what differs, so each deviation from the defaults is visible at a glance.
// ---------------------------------------------------------------------------------------

/// RFC 7643 §2.2 defaults: single-valued, optional, caseExact false, readWrite,
/// returned default, uniqueness none. A reference (a URL) and binary data are case exact
/// whatever the RFC's schema listings say (RFC 7643 §2.3.6, §2.3.7): a photo's URL in
/// other letters is another photo, and de-duplication already compares them so.
const fn base(name: &'static str, kind: AttrKind, description: &'static str) -> AttrDef {
    AttrDef {
        name,
        kind,
        multi_valued: false,
        description,
        required: false,
        case_exact: matches!(kind, AttrKind::Reference | AttrKind::Binary),
        mutability: Mutability::ReadWrite,
        returned: Returned::Default,
        uniqueness: Uniqueness::None,
        canonical_values: &[],
        reference_types: &[],
        sub_attributes: &[],
    }
}

const fn string(name: &'static str, description: &'static str) -> AttrDef {
    base(name, AttrKind::String, description)
}

/// The `value` that holds a resource's `id` (a member, a group, a manager): compared as
/// `id` is, case and all (RFC 7643 §3.1), though RFC 7643's schema listings say
/// otherwise. Members are added and removed by exact id, and the stored manager is
/// looked up by it, so a filter that folded case would find what those cannot.
const fn id_value(description: &'static str) -> AttrDef {
    AttrDef {
        case_exact: true,
        ..string("value", description)
    }
}

const fn complex(
    name: &'static str,
    description: &'static str,
    subs: &'static [AttrDef],
) -> AttrDef {
    AttrDef {
        sub_attributes: subs,
        ..base(name, AttrKind::Complex, description)
    }
}

const fn multi_complex(
    name: &'static str,
    description: &'static str,
    subs: &'static [AttrDef],
) -> AttrDef {
    AttrDef {
        multi_valued: true,
        ..complex(name, description, subs)
    }
}

/// The `value`/`display`/`type`/`primary` quartet shared by most multi-valued User
/// attributes (RFC 7643 §2.4); only the value's type and the canonical types vary.
const fn plural_subs(value: AttrDef, canonical_types: &'static [&'static str]) -> [AttrDef; 4] {
    [
        value,
        string(
            "display",
            "A human-readable name, primarily used for display purposes.",
        ),
        AttrDef {
            canonical_values: canonical_types,
            ..string("type", "A label indicating the attribute's function.")
        },
        base(
            "primary",
            AttrKind::Boolean,
            "Whether this is the preferred value; at most one value may be primary.",
        ),
    ]
}

const fn read_only(def: AttrDef) -> AttrDef {
    AttrDef {
        mutability: Mutability::ReadOnly,
        ..def
    }
}

const fn immutable(def: AttrDef) -> AttrDef {
    AttrDef {
        mutability: Mutability::Immutable,
        ..def
    }
}

static NAME_SUBS: [AttrDef; 6] = [
    string(
        "formatted",
        "The full name, including all middle names, titles and suffixes, formatted for display.",
    ),
    string("familyName", "The family name of the User, or last name."),
    string("givenName", "The given name of the User, or first name."),
    string("middleName", "The middle name(s) of the User."),
    string(
        "honorificPrefix",
        "The honorific prefix(es) of the User, e.g. 'Ms.'.",
    ),
    string(
        "honorificSuffix",
        "The honorific suffix(es) of the User, e.g. 'III'.",
    ),
];

static EMAIL_SUBS: [AttrDef; 4] = plural_subs(
    string(
        "value",
        "Email address for the User, canonicalized per RFC 5321.",
    ),
    &["work", "home", "other"],
);

static PHONE_SUBS: [AttrDef; 4] = plural_subs(
    string(
        "value",
        "Phone number of the User, preferably in RFC 3966 form.",
    ),
    &["work", "home", "mobile", "fax", "pager", "other"],
);

static IM_SUBS: [AttrDef; 4] = plural_subs(
    string("value", "Instant messaging address for the User."),
    &["aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"],
);

static PHOTO_SUBS: [AttrDef; 4] = plural_subs(
    AttrDef {
        reference_types: &["external"],
        ..base("value", AttrKind::Reference, "URL of a photo of the User.")
    },
    &["photo", "thumbnail"],
);

static ADDRESS_SUBS: [AttrDef; 8] = [
    string(
        "formatted",
        "The full mailing address, formatted for display or use with a mailing label.",
    ),
    string(
        "streetAddress",
        "The full street address component, which may include house number, street name, \
         P.O. box and multi-line extended street address information.",
    ),
    string("locality", "The city or locality component."),
    string("region", "The state or region component."),
    string("postalCode", "The zip code or postal code component."),
    string(
        "country",
        "The country name component, as an ISO 3166-1 alpha-2 code.",
    ),
    AttrDef {
        canonical_values: &["work", "home", "other"],
        ..string("type", "A label indicating the address's function.")
    },
    base(
        "primary",
        AttrKind::Boolean,
        "Whether this is the preferred mailing address.",
    ),
];

/// Group membership is computed from the Group side (RFC 7643 §4.1.2), hence read-only
/// throughout.
static USER_GROUP_SUBS: [AttrDef; 4] = [
    read_only(id_value("The identifier of the User's group.")),
    read_only(AttrDef {
        reference_types: &["User", "Group"],
        ..base(
            "$ref",
            AttrKind::Reference,
            "The URI of the corresponding Group resource.",
        )
    }),
    read_only(string(
        "display",
        "A human-readable name, primarily used for display purposes.",
    )),
    read_only(AttrDef {
        canonical_values: &["direct", "indirect"],
        ..string(
            "type",
            "Whether membership is direct or through another group.",
        )
    }),
];

static ENTITLEMENT_SUBS: [AttrDef; 4] =
    plural_subs(string("value", "The value of an entitlement."), &[]);

static ROLE_SUBS: [AttrDef; 4] = plural_subs(string("value", "The value of a role."), &[]);

static X509_SUBS: [AttrDef; 4] = plural_subs(
    base(
        "value",
        AttrKind::Binary,
        "The value of an X.509 certificate (base64 DER).",
    ),
    &[],
);

pub static USER: SchemaDef = SchemaDef {
    id: USER_SCHEMA,
    name: "User",
    description: "User Account",
    attributes: &[
        AttrDef {
            required: true,
            uniqueness: Uniqueness::Server,
            ..string(
                "userName",
                "Unique identifier for the User, typically used to authenticate directly \
                 with the service provider.",
            )
        },
        complex(
            "name",
            "The components of the User's real name.",
            &NAME_SUBS,
        ),
        string(
            "displayName",
            "The name of the User, suitable for display to end-users.",
        ),
        string(
            "nickName",
            "The casual way to address the User in real life.",
        ),
        AttrDef {
            reference_types: &["external"],
            ..base(
                "profileUrl",
                AttrKind::Reference,
                "A fully qualified URL pointing to a page representing the User's online profile.",
            )
        },
        string("title", "The User's title, such as 'Vice President'."),
        string(
            "userType",
            "Identifies the relationship between the organization and the User, e.g. 'Employee'.",
        ),
        string(
            "preferredLanguage",
            "The User's preferred written or spoken language (RFC 7231 Accept-Language).",
        ),
        string(
            "locale",
            "The User's default location for localizing currency, dates and numbers.",
        ),
        string(
            "timezone",
            "The User's time zone in IANA Time Zone database format, e.g. 'America/Los_Angeles'.",
        ),
        base(
            "active",
            AttrKind::Boolean,
            "The User's administrative status.",
        ),
        AttrDef {
            mutability: Mutability::WriteOnly,
            returned: Returned::Never,
            ..string(
                "password",
                "The User's cleartext password, used to set or change it; never returned.",
            )
        },
        multi_complex("emails", "Email addresses for the User.", &EMAIL_SUBS),
        multi_complex("phoneNumbers", "Phone numbers for the User.", &PHONE_SUBS),
        multi_complex("ims", "Instant messaging addresses for the User.", &IM_SUBS),
        multi_complex("photos", "URLs of photos of the User.", &PHOTO_SUBS),
        multi_complex(
            "addresses",
            "A physical mailing address for the User.",
            &ADDRESS_SUBS,
        ),
        read_only(multi_complex(
            "groups",
            "The groups the User belongs to, directly or indirectly.",
            &USER_GROUP_SUBS,
        )),
        multi_complex(
            "entitlements",
            "Entitlements granted to the User.",
            &ENTITLEMENT_SUBS,
        ),
        multi_complex("roles", "Roles of the User.", &ROLE_SUBS),
        multi_complex(
            "x509Certificates",
            "X.509 certificates issued to the User.",
            &X509_SUBS,
        ),
    ],
};

static MANAGER_SUBS: [AttrDef; 3] = [
    id_value("The id of the SCIM resource representing the User's manager."),
    AttrDef {
        reference_types: &["User"],
        ..base(
            "$ref",
            AttrKind::Reference,
            "The URI of the SCIM resource representing the User's manager.",
        )
    },
    // RFC 7643 has the server resolve it; rosterd keeps what the IdP sends (Okta sends
    // it), so the schema says the client owns it rather than dropping the value.
    string(
        "displayName",
        "The displayName of the User's manager, as the client sent it.",
    ),
];

pub static ENTERPRISE_USER: SchemaDef = SchemaDef {
    id: ENTERPRISE_USER_SCHEMA,
    name: "EnterpriseUser",
    description: "Enterprise User",
    attributes: &[
        string(
            "employeeNumber",
            "Numeric or alphanumeric identifier assigned to a person by the organization.",
        ),
        string("costCenter", "Identifies the name of a cost center."),
        string("organization", "Identifies the name of an organization."),
        string("division", "Identifies the name of a division."),
        string("department", "Identifies the name of a department."),
        complex(
            "manager",
            "The User's manager; a complex type that optionally allows service providers to \
             represent organizational hierarchy by referencing the manager's id.",
            &MANAGER_SUBS,
        ),
    ],
};

/// A member entry identifies one resource; changing it in place would silently re-point the
/// membership, so clients must remove and re-add instead (hence immutable). `display` is
/// accepted from clients for convenience but always recomputed, so it is published as
/// read-only.
pub(crate) static MEMBER_SUBS: [AttrDef; 4] = [
    immutable(id_value("Identifier of the member of this Group.")),
    immutable(AttrDef {
        reference_types: &["User", "Group"],
        ..base(
            "$ref",
            AttrKind::Reference,
            "The URI corresponding to a SCIM resource that is a member of this Group.",
        )
    }),
    immutable(AttrDef {
        canonical_values: &["User", "Group"],
        ..string(
            "type",
            "A label indicating the type of resource, e.g. 'User' or 'Group'.",
        )
    }),
    read_only(string("display", "A human-readable name for the member.")),
];

pub static GROUP: SchemaDef = SchemaDef {
    id: GROUP_SCHEMA,
    name: "Group",
    description: "Group",
    attributes: &[
        AttrDef {
            required: true,
            uniqueness: Uniqueness::Server,
            ..string("displayName", "A human-readable name for the Group.")
        },
        multi_complex("members", "A list of members of the Group.", &MEMBER_SUBS),
    ],
};

static META_SUBS: [AttrDef; 5] = [
    read_only(AttrDef {
        case_exact: true,
        ..string(
            "resourceType",
            "The name of the resource type of the resource.",
        )
    }),
    read_only(base(
        "created",
        AttrKind::DateTime,
        "The date and time the resource was added to the service provider.",
    )),
    read_only(base(
        "lastModified",
        AttrKind::DateTime,
        "The most recent date and time the resource was modified.",
    )),
    read_only(AttrDef {
        case_exact: true,
        reference_types: &["uri"],
        ..base(
            "location",
            AttrKind::Reference,
            "The URI of the resource being returned.",
        )
    }),
    read_only(AttrDef {
        case_exact: true,
        ..string(
            "version",
            "The version (ETag) of the resource being returned.",
        )
    }),
];

/// RFC 7643 §3.1 attributes present on every resource but belonging to no schema. They are
/// kept apart so that `schema_json` does not publish them while `lookup` still types them.
pub static COMMON_ATTRIBUTES: &[AttrDef] = &[
    AttrDef {
        case_exact: true,
        mutability: Mutability::ReadOnly,
        returned: Returned::Always,
        uniqueness: Uniqueness::Server,
        ..string(
            "id",
            "A unique identifier for a SCIM resource as defined by the service provider.",
        )
    },
    AttrDef {
        case_exact: true,
        ..string(
            "externalId",
            "An identifier for the resource as defined by the provisioning client.",
        )
    },
    read_only(complex(
        "meta",
        "Resource metadata maintained by the service provider.",
        &META_SUBS,
    )),
];

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&SchemaDef; 3] = [&USER, &ENTERPRISE_USER, &GROUP];

    /// Every attribute and sub-attribute of every schema plus the common attributes.
    fn all_attrs() -> Vec<&'static AttrDef> {
        fn walk(attrs: &'static [AttrDef], out: &mut Vec<&'static AttrDef>) {
            for a in attrs {
                out.push(a);
                walk(a.sub_attributes, out);
            }
        }
        let mut out = Vec::new();
        for s in ALL {
            walk(s.attributes, &mut out);
        }
        walk(COMMON_ATTRIBUTES, &mut out);
        out
    }

    #[test]
    fn lookup_is_case_insensitive() {
        let a = lookup(ResourceKind::User, None, "USERNAME", None).expect("userName");
        assert_eq!(a.name, "userName");
        let a = lookup(ResourceKind::User, None, "Name", Some("GIVENname")).expect("givenName");
        assert_eq!(a.name, "givenName");
        let a = lookup(ResourceKind::Group, None, "MEMBERS", Some("VALUE")).expect("value");
        assert_eq!(a.mutability, Mutability::Immutable);
    }

    #[test]
    fn lookup_urn_qualified() {
        let core = USER_SCHEMA.to_ascii_uppercase();
        let a = lookup(ResourceKind::User, Some(&core), "emails", Some("type")).expect("type");
        assert_eq!(a.canonical_values, &["work", "home", "other"]);

        let ent = ENTERPRISE_USER_SCHEMA.to_ascii_lowercase();
        let a = lookup(
            ResourceKind::User,
            Some(&ent),
            "Manager",
            Some("displayname"),
        )
        .expect("manager.displayName");
        assert_eq!(a.mutability, Mutability::ReadWrite);
        assert!(
            lookup(
                ResourceKind::User,
                Some(ENTERPRISE_USER_SCHEMA),
                "department",
                None
            )
            .is_some()
        );

        let g = GROUP_SCHEMA.to_ascii_uppercase();
        assert!(lookup(ResourceKind::Group, Some(&g), "displayName", None).is_some());
        // A URN foreign to the resource kind resolves nothing.
        assert!(lookup(ResourceKind::Group, Some(USER_SCHEMA), "displayName", None).is_none());
        assert!(lookup(ResourceKind::User, Some(GROUP_SCHEMA), "displayName", None).is_none());
    }

    #[test]
    fn enterprise_attrs_need_urn() {
        for name in ["employeeNumber", "department", "manager", "costCenter"] {
            assert!(
                lookup(ResourceKind::User, None, name, None).is_none(),
                "{name}"
            );
            assert!(
                lookup(ResourceKind::User, Some(USER_SCHEMA), name, None).is_none(),
                "{name}"
            );
        }
        assert!(
            lookup(
                ResourceKind::Group,
                Some(ENTERPRISE_USER_SCHEMA),
                "department",
                None
            )
            .is_none()
        );
    }

    #[test]
    fn sub_attributes_resolve() {
        let a = lookup(ResourceKind::User, None, "addresses", Some("postalcode")).expect("sub");
        assert_eq!(a.name, "postalCode");
        let a = lookup(ResourceKind::User, None, "groups", Some("$REF")).expect("$ref");
        assert_eq!(a.kind, AttrKind::Reference);
        let a = lookup(ResourceKind::User, None, "x509certificates", Some("value")).expect("x509");
        assert_eq!(a.kind, AttrKind::Binary);
        assert!(lookup(ResourceKind::User, None, "name", Some("nope")).is_none());
        assert!(lookup(ResourceKind::User, None, "userName", Some("value")).is_none());
    }

    #[test]
    fn common_attributes_resolve() {
        let id = lookup(ResourceKind::User, None, "id", None).expect("id");
        assert_eq!(id.returned, Returned::Always);
        assert_eq!(id.mutability, Mutability::ReadOnly);
        let lm = lookup(ResourceKind::User, None, "meta", Some("lastModified")).expect("lm");
        assert_eq!(lm.kind, AttrKind::DateTime);
        let ext = lookup(ResourceKind::Group, Some(GROUP_SCHEMA), "EXTERNALID", None);
        assert!(ext.is_some());
        assert!(lookup_common("Meta", Some("LOCATION")).is_some());
        assert!(lookup_common("userName", None).is_none());
        // Common attributes are not reachable through an extension URN.
        assert!(lookup(ResourceKind::User, Some(ENTERPRISE_USER_SCHEMA), "id", None).is_none());
    }

    #[test]
    fn case_exactness() {
        assert!(
            !lookup(ResourceKind::User, None, "userName", None)
                .expect("u")
                .case_exact
        );
        assert!(
            lookup(ResourceKind::User, None, "id", None)
                .expect("id")
                .case_exact
        );
        assert!(lookup_common("externalId", None).expect("e").case_exact);
        for (attr, sub) in [
            ("photos", "value"),
            ("x509Certificates", "value"),
            ("groups", "$ref"),
            ("manager", "value"),
        ] {
            let urn = (attr == "manager").then_some(ENTERPRISE_USER_SCHEMA);
            assert!(
                lookup(ResourceKind::User, urn, attr, Some(sub))
                    .expect(attr)
                    .case_exact,
                "{attr}.{sub}"
            );
        }
    }

    #[test]
    fn kind_helpers() {
        assert_eq!(ResourceKind::User.name(), "User");
        assert_eq!(ResourceKind::Group.endpoint(), "Groups");
        assert_eq!(core_schema(ResourceKind::Group).id, GROUP_SCHEMA);
        let ids: Vec<_> = schemas_of(ResourceKind::User)
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, [USER_SCHEMA, ENTERPRISE_USER_SCHEMA]);
        assert_eq!(schemas_of(ResourceKind::Group).len(), 1);
    }

    fn check_attr_json(v: &Value) {
        let o = v.as_object().expect("attribute is an object");
        for key in [
            "name",
            "type",
            "multiValued",
            "description",
            "required",
            "caseExact",
            "mutability",
            "returned",
            "uniqueness",
        ] {
            assert!(o.contains_key(key), "{key} missing in {v}");
        }
        let ty = o["type"].as_str().expect("type");
        assert!(
            [
                "string",
                "boolean",
                "decimal",
                "integer",
                "dateTime",
                "binary",
                "reference",
                "complex"
            ]
            .contains(&ty)
        );
        let m = o["mutability"].as_str().expect("mutability");
        assert!(["readOnly", "readWrite", "immutable", "writeOnly"].contains(&m));
        let r = o["returned"].as_str().expect("returned");
        assert!(["always", "never", "default", "request"].contains(&r));
        let u = o["uniqueness"].as_str().expect("uniqueness");
        assert!(["none", "server", "global"].contains(&u));
        assert!(!o["description"].as_str().expect("description").is_empty());
        if ty == "complex" {
            let subs = o["subAttributes"].as_array().expect("subAttributes");
            assert!(!subs.is_empty());
            subs.iter().for_each(check_attr_json);
        } else {
            assert!(!o.contains_key("subAttributes"));
        }
        if ty == "reference" {
            assert!(
                !o["referenceTypes"]
                    .as_array()
                    .expect("referenceTypes")
                    .is_empty()
            );
        }
    }

    #[test]
    fn schema_json_shape() {
        for s in ALL {
            let v = schema_json(s, "https://x.test/scim/v2");
            assert_eq!(v["schemas"], json!([SCHEMA_SCHEMA]));
            assert_eq!(v["id"], s.id);
            assert_eq!(v["name"], s.name);
            assert_eq!(v["meta"]["resourceType"], "Schema");
            assert_eq!(
                v["meta"]["location"],
                format!("https://x.test/scim/v2/Schemas/{}", s.id)
            );
            let attrs = v["attributes"].as_array().expect("attributes");
            assert_eq!(attrs.len(), s.attributes.len());
            attrs.iter().for_each(check_attr_json);
            for common in ["id", "externalId", "meta"] {
                assert!(attrs.iter().all(|a| a["name"] != common));
            }
        }
        let v = schema_json(&USER, "");
        let pw = &v["attributes"][11];
        assert_eq!(pw["name"], "password");
        assert_eq!(pw["mutability"], "writeOnly");
        assert_eq!(pw["returned"], "never");
        assert_eq!(v["attributes"][0]["uniqueness"], "server");
        let groups = &v["attributes"][17];
        assert_eq!(groups["name"], "groups");
        assert_eq!(groups["multiValued"], true);
        assert_eq!(groups["mutability"], "readOnly");
        assert_eq!(
            groups["subAttributes"][3]["canonicalValues"],
            json!(["direct", "indirect"])
        );
    }

    #[test]
    fn no_writable_datetime_or_decimal() {
        for a in all_attrs() {
            if matches!(a.kind, AttrKind::DateTime | AttrKind::Decimal) {
                assert_eq!(a.mutability, Mutability::ReadOnly, "{}", a.name);
            }
        }
    }

    #[test]
    fn complex_iff_sub_attributes() {
        for a in all_attrs() {
            assert_eq!(
                a.kind == AttrKind::Complex,
                !a.sub_attributes.is_empty(),
                "{}",
                a.name
            );
            assert!(!a.description.is_empty(), "{}", a.name);
            if a.kind == AttrKind::Reference {
                assert!(!a.reference_types.is_empty(), "{}", a.name);
            }
        }
    }

    #[test]
    fn names_unique_within_scope() {
        fn check(attrs: &[AttrDef]) {
            for (i, a) in attrs.iter().enumerate() {
                assert!(
                    attrs[i + 1..]
                        .iter()
                        .all(|b| !b.name.eq_ignore_ascii_case(a.name)),
                    "duplicate {}",
                    a.name
                );
                check(a.sub_attributes);
            }
        }
        for s in ALL {
            check(s.attributes);
            // Core names must not shadow the common attributes the fallback resolves.
            for c in COMMON_ATTRIBUTES {
                assert!(find(s.attributes, c.name).is_none(), "{}", c.name);
            }
        }
        check(COMMON_ATTRIBUTES);
    }
}
