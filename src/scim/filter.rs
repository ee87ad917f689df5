//! SCIM filter and attribute-path grammar (RFC 7644 §3.4.2.2, §3.5.2) and evaluation
//! against stored resources.
//!
//! The parser is a small recursive-descent one over a token stream: the grammar is tiny,
//! and hand-written descent gives error messages that name the offending token, which a
//! parser generator would not.
use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, FixedOffset};
use serde_json::{Map, Value};

use crate::scim::error::{ScimError, ScimResult};
use crate::scim::schema::{
    self, AttrKind, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, ResourceKind, USER_SCHEMA,
};

/// Deepest nesting of parentheses, brackets and `not` accepted: a filter is a query
/// parameter, and unbounded recursion on hostile input would overflow the stack.
pub const MAX_DEPTH: usize = 64;

/// Most comparisons one filter may hold. A chain of `or`s parses in a loop, but it is
/// evaluated, planned and dropped as a tree as deep as the chain is long: 7,000 terms
/// overflowed a worker's stack and took the daemon down. Lookups by a list of ids or
/// names stay far below this.
pub const MAX_TERMS: usize = 1_000;

/// `[urn ":"] attr ["." sub]`. Names keep the case the client sent; all matching is
/// case-insensitive.
#[derive(Debug, Clone, PartialEq)]
pub struct AttrPath {
    /// Schema URN when the client qualified the name, e.g.
    /// `urn:ietf:params:scim:schemas:extension:enterprise:2.0:User`.
    pub urn: Option<String>,
    /// Empty when the path names a whole schema (`attributes=urn:…:enterprise:2.0:User`).
    pub attr: String,
    pub sub: Option<String>,
}

impl AttrPath {
    /// An unqualified path, as used inside value filters.
    pub fn simple(attr: &str) -> AttrPath {
        AttrPath {
            urn: None,
            attr: attr.to_owned(),
            sub: None,
        }
    }

    /// The path names a whole schema extension rather than an attribute.
    pub fn is_whole_schema(&self) -> bool {
        self.attr.is_empty()
    }

    /// The URN names the core schema (or no URN was given).
    pub fn is_core(&self) -> bool {
        self.urn.as_deref().is_none_or(is_core_urn)
    }

    /// Give an extension attribute named without its URN (`department`) the URN of the
    /// one extension of `kind` that has it (see [`schema::extension_owning`]).
    pub fn qualify_for(&mut self, kind: ResourceKind) {
        if self.urn.is_none()
            && !self.attr.is_empty()
            && let Some(ext) = schema::extension_owning(kind, &self.attr)
        {
            self.urn = Some(ext.id.to_owned());
        }
    }

    /// [`Self::qualify_for`] where the resource is not known yet (a filter or an
    /// attribute list of `/.search` spans both). Only User has extensions, and none of
    /// their attribute names is a Group attribute, so such a path qualified for User
    /// matches nothing on a Group, as it did unqualified.
    fn qualify(&mut self) {
        self.qualify_for(ResourceKind::User)
    }
}

/// `inner`, named inside `outer`'s value filter, as the sub-attribute it is. An inner
/// name that is no plain name (`type.value`, one with a URN) is kept whole, so that no
/// schema finds it and an error shows it as written.
fn sub_of(outer: &AttrPath, inner: &AttrPath) -> AttrPath {
    AttrPath {
        urn: outer.urn.clone(),
        attr: outer.attr.clone(),
        sub: Some(inner.to_string()),
    }
}

fn is_core_urn(u: &str) -> bool {
    u.eq_ignore_ascii_case(USER_SCHEMA) || u.eq_ignore_ascii_case(GROUP_SCHEMA)
}

fn known_urn(u: &str) -> bool {
    is_core_urn(u) || u.eq_ignore_ascii_case(ENTERPRISE_USER_SCHEMA)
}

impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.urn, self.attr.is_empty()) {
            (Some(u), true) => write!(f, "{u}")?,
            (Some(u), false) => write!(f, "{u}:{}", self.attr)?,
            (None, _) => write!(f, "{}", self.attr)?,
        }
        if let Some(s) = &self.sub {
            write!(f, ".{s}")?;
        }
        Ok(())
    }
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

impl CompareOp {
    fn from_word(w: &str) -> Option<CompareOp> {
        Some(match w.to_ascii_lowercase().as_str() {
            "eq" => CompareOp::Eq,
            "ne" => CompareOp::Ne,
            "co" => CompareOp::Co,
            "sw" => CompareOp::Sw,
            "ew" => CompareOp::Ew,
            "gt" => CompareOp::Gt,
            "ge" => CompareOp::Ge,
            "lt" => CompareOp::Lt,
            "le" => CompareOp::Le,
            _ => return None,
        })
    }

    /// Whether the operator means anything for an attribute of `kind` (RFC 7644
    /// §3.4.2.2): a boolean or binary value has no order, and a boolean no substrings.
    pub fn applies_to(self, kind: AttrKind) -> bool {
        match self {
            CompareOp::Gt | CompareOp::Ge | CompareOp::Lt | CompareOp::Le => {
                !matches!(kind, AttrKind::Boolean | AttrKind::Binary)
            }
            CompareOp::Co | CompareOp::Sw | CompareOp::Ew => kind != AttrKind::Boolean,
            CompareOp::Eq | CompareOp::Ne => true,
        }
    }

    /// Why the operator does not apply to an attribute (see [`Self::applies_to`]), for
    /// the `invalidFilter` detail after the attribute's path.
    pub fn misapplied(self) -> &'static str {
        match self {
            CompareOp::Co | CompareOp::Sw | CompareOp::Ew => {
                "is a boolean: co, sw and ew do not apply to it (RFC 7644 §3.4.2.2)"
            }
            _ => "has no order: gt, ge, lt and le do not apply to it (RFC 7644 §3.4.2.2)",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Co => "co",
            CompareOp::Sw => "sw",
            CompareOp::Ew => "ew",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
        }
    }
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

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::Compare { path, op, value } => write!(f, "{path} {} {value}", op.as_str()),
            Filter::Present(p) => write!(f, "{p} pr"),
            Filter::And(a, b) => {
                f.write_str("(")?;
                a.write_left_of(f, "and")?;
                write!(f, " and {b})")
            }
            Filter::Or(a, b) => {
                f.write_str("(")?;
                a.write_left_of(f, "or")?;
                write!(f, " or {b})")
            }
            Filter::Not(a) => write!(f, "not ({a})"),
            Filter::ValuePath { path, filter } => write!(f, "{path}[{filter}]"),
        }
    }
}

impl Filter {
    /// This filter as the left side of `op` ("and" or "or"), without brackets while it is
    /// a chain of the same `op`: `a or b or c` parses as one level, and printed with a
    /// bracket per term it nested past [`MAX_DEPTH`] and no longer parsed.
    fn write_left_of(&self, f: &mut fmt::Formatter<'_>, op: &str) -> fmt::Result {
        match (self, op) {
            (Filter::And(a, b), "and") | (Filter::Or(a, b), "or") => {
                a.write_left_of(f, op)?;
                write!(f, " {op} {b}")
            }
            _ => write!(f, "{self}"),
        }
    }
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

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// An attribute path, keyword or operator word; which one depends on position.
    Word(String),
    Str(String),
    Num(serde_json::Number),
    LParen,
    RParen,
    LBracket,
    RBracket,
    /// `.sub` directly after `]` (PATCH paths only).
    DotWord(String),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Word(w) => write!(f, "{w:?}"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::LParen => f.write_str("\"(\""),
            Tok::RParen => f.write_str("\")\""),
            Tok::LBracket => f.write_str("\"[\""),
            Tok::RBracket => f.write_str("\"]\""),
            Tok::DotWord(w) => write!(f, "\".{w}\""),
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '$' | ':' | '.')
}

fn tokenize(input: &str, err: fn(String) -> ScimError) -> ScimResult<Vec<Tok>> {
    let mut toks = Vec::new();
    let chars: Vec<char> = input.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                toks.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                toks.push(Tok::RParen);
                i += 1;
            }
            '[' => {
                toks.push(Tok::LBracket);
                i += 1;
            }
            ']' => {
                toks.push(Tok::RBracket);
                i += 1;
                if chars.get(i) == Some(&'.') {
                    let start = i + 1;
                    let mut j = start;
                    while j < chars.len() && is_word_char(chars[j]) {
                        j += 1;
                    }
                    if j == start {
                        return Err(err("\".\" after \"]\" must name a sub-attribute".into()));
                    }
                    toks.push(Tok::DotWord(chars[start..j].iter().collect()));
                    i = j;
                }
            }
            '"' => {
                // JSON string rules, so escapes mean what clients expect.
                let start = i;
                i += 1;
                let mut escaped = false;
                while i < chars.len() {
                    match chars[i] {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(err("unterminated string".into()));
                }
                let lit: String = chars[start..=i].iter().collect();
                let s: String = serde_json::from_str(&lit)
                    .map_err(|e| err(format!("bad string literal {lit}: {e}")))?;
                toks.push(Tok::Str(s));
                i += 1;
            }
            c if c == '-' || c.is_ascii_digit() => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || matches!(chars[i], '-' | '+' | '.' | 'e' | 'E'))
                {
                    i += 1;
                }
                let lit: String = chars[start..i].iter().collect();
                let n: serde_json::Number = lit
                    .parse()
                    .map_err(|_| err(format!("bad number {lit:?}")))?;
                toks.push(Tok::Num(n));
            }
            c if is_word_char(c) => {
                let start = i;
                while i < chars.len() && is_word_char(chars[i]) {
                    i += 1;
                }
                toks.push(Tok::Word(chars[start..i].iter().collect()));
            }
            other => return Err(err(format!("unexpected character {other:?}"))),
        }
    }
    Ok(toks)
}

/// `[URN ":"] attr ["." sub]`, or a bare known schema URN.
fn parse_attr_path(word: &str, err: fn(String) -> ScimError) -> ScimResult<AttrPath> {
    let bad = || err(format!("{word:?} is not an attribute path"));
    // Attribute lists reach here untokenized: `word` may hold any character.
    if super::urn_prefixed(word) {
        if known_urn(word) {
            return Ok(AttrPath {
                urn: Some(word.to_owned()),
                attr: String::new(),
                sub: None,
            });
        }
        let (urn, rest) = word.rsplit_once(':').ok_or_else(bad)?;
        let mut p = parse_attr_path(rest, err).map_err(|_| bad())?;
        if p.is_whole_schema() || urn.len() <= 4 {
            return Err(bad());
        }
        p.urn = Some(urn.to_owned());
        return Ok(p);
    }
    let (attr, sub) = match word.split_once('.') {
        Some((a, s)) => (a, Some(s)),
        None => (word, None),
    };
    let valid_name = |n: &str| {
        let mut cs = n.chars();
        cs.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '$')
            && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '$'))
    };
    if !valid_name(attr) || sub.is_some_and(|s| !valid_name(s)) {
        return Err(bad());
    }
    Ok(AttrPath {
        urn: None,
        attr: attr.to_owned(),
        sub: sub.map(str::to_owned),
    })
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    terms: usize,
    err: fn(String) -> ScimError,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn fail<T>(&self, msg: impl Into<String>) -> ScimResult<T> {
        Err((self.err)(msg.into()))
    }

    fn peek_keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn enter(&mut self) -> ScimResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.fail(format!("filter nests deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    // FILTER = or-expression; `or` binds loosest, then `and`, then `not`.
    fn or_expr(&mut self, in_value: bool) -> ScimResult<Filter> {
        let mut left = self.and_expr(in_value)?;
        while self.peek_keyword("or") {
            self.pos += 1;
            let right = self.and_expr(in_value)?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self, in_value: bool) -> ScimResult<Filter> {
        let mut left = self.unary(in_value)?;
        while self.peek_keyword("and") {
            self.pos += 1;
            let right = self.unary(in_value)?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, in_value: bool) -> ScimResult<Filter> {
        self.enter()?;
        let out = self.unary_inner(in_value);
        self.depth -= 1;
        out
    }

    fn unary_inner(&mut self, in_value: bool) -> ScimResult<Filter> {
        if self.peek_keyword("not") && matches!(self.toks.get(self.pos + 1), Some(Tok::LParen)) {
            self.pos += 1;
            // The parenthesis that must follow is the level: `not (` counts once.
            let inner = self.unary_inner(in_value)?;
            return Ok(Filter::Not(Box::new(inner)));
        }
        // `not userName eq "x"` would otherwise read `userName` as an operator.
        if self.peek_keyword("not")
            && let Some(Tok::Word(w)) = self.toks.get(self.pos + 1)
            && CompareOp::from_word(w).is_none()
            && !w.eq_ignore_ascii_case("pr")
        {
            return self.fail("\"not\" takes a filter in parentheses: not (userName eq \"x\")");
        }
        match self.next() {
            Some(Tok::LParen) => {
                let inner = self.or_expr(in_value)?;
                match self.next() {
                    Some(Tok::RParen) => Ok(inner),
                    Some(t) => self.fail(format!("expected \")\", found {t}")),
                    None => self.fail("missing \")\""),
                }
            }
            Some(Tok::Word(w)) => {
                let path = parse_attr_path(&w, self.err)?;
                if path.is_whole_schema() {
                    return self.fail(format!("{w:?} names a schema, not an attribute"));
                }
                if self.peek() == Some(&Tok::LBracket) {
                    if in_value {
                        return self.fail("value filters cannot nest");
                    }
                    if path.sub.is_some() {
                        return self.fail(format!(
                            "{w:?}: a value filter follows an attribute, not a sub-attribute"
                        ));
                    }
                    self.pos += 1;
                    let inner = self.or_expr(true)?;
                    match self.next() {
                        Some(Tok::RBracket) => {}
                        Some(t) => return self.fail(format!("expected \"]\", found {t}")),
                        None => return self.fail("missing \"]\""),
                    }
                    // `emails[type eq "work"].value eq "x"`: outside RFC 7644's grammar,
                    // but Entra matches users with it. It means an element that passes
                    // the value filter and whose sub-attribute passes the comparison.
                    let sub = match self.peek() {
                        Some(Tok::DotWord(sub)) => Some(sub.clone()),
                        _ => None,
                    };
                    let inner = match sub {
                        Some(sub) => {
                            self.pos += 1;
                            let sub_path = parse_attr_path(&sub, self.err)?;
                            Filter::And(Box::new(inner), Box::new(self.comparison(sub_path)?))
                        }
                        None => inner,
                    };
                    return Ok(Filter::ValuePath {
                        path,
                        filter: Box::new(inner),
                    });
                }
                self.comparison(path)
            }
            Some(t) => self.fail(format!("expected an attribute, found {t}")),
            None => self.fail("filter ends where an attribute was expected"),
        }
    }

    fn comparison(&mut self, path: AttrPath) -> ScimResult<Filter> {
        self.terms += 1;
        if self.terms > MAX_TERMS {
            return self.fail(format!(
                "filter has more than {MAX_TERMS} comparisons; split it into several requests"
            ));
        }
        let op_word = match self.next() {
            Some(Tok::Word(w)) => w,
            Some(t) => return self.fail(format!("expected an operator after {path}, found {t}")),
            None => return self.fail(format!("expected an operator after {path}")),
        };
        if op_word.eq_ignore_ascii_case("pr") {
            return Ok(Filter::Present(path));
        }
        let Some(op) = CompareOp::from_word(&op_word) else {
            return self.fail(format!("unknown operator {op_word:?}"));
        };
        let value = match self.next() {
            Some(Tok::Str(s)) => Value::String(s),
            Some(Tok::Num(n)) => Value::Number(n),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
            Some(t) => {
                return self.fail(format!(
                    "{path} {op_word}: expected a string, number, true, false or null, found {t}"
                ));
            }
            None => return self.fail(format!("{path} {op_word}: missing comparison value")),
        };
        Ok(Filter::Compare { path, op, value })
    }
}

/// Parse a filter expression. Errors are `invalidFilter`.
pub fn parse_filter(input: &str) -> ScimResult<Filter> {
    let err: fn(String) -> ScimError = ScimError::invalid_filter;
    let toks = tokenize(input, err)?;
    if toks.is_empty() {
        return Err(err("empty filter".into()));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        terms: 0,
        err,
    };
    let mut f = p.or_expr(false)?;
    if let Some(t) = p.peek() {
        return Err(err(format!("unexpected {t} after a complete filter")));
    }
    f.qualify();
    Ok(f)
}

/// Parse a PATCH path. Errors are `invalidPath`.
pub fn parse_path(input: &str) -> ScimResult<PatchPath> {
    let err: fn(String) -> ScimError = ScimError::invalid_path;
    let toks = tokenize(input, err)?;
    let mut it = toks.into_iter();
    let attr = match it.next() {
        Some(Tok::Word(w)) => parse_attr_path(&w, err)?,
        Some(t) => return Err(err(format!("path must start with an attribute, found {t}"))),
        None => return Err(err("empty path".into())),
    };
    let rest: Vec<Tok> = it.collect();
    if rest.is_empty() {
        return Ok(PatchPath {
            attr,
            filter: None,
            sub_after_filter: None,
        });
    }
    if rest.first() != Some(&Tok::LBracket) {
        return Err(err(format!("unexpected text after {attr}")));
    }
    if attr.sub.is_some() || attr.is_whole_schema() {
        return Err(err(format!(
            "{attr}: a value filter follows an attribute name"
        )));
    }
    let (sub_after_filter, body_end) = match rest.last() {
        Some(Tok::DotWord(w)) => (Some(w.clone()), rest.len() - 1),
        _ => (None, rest.len()),
    };
    if body_end < 3 || rest[body_end - 1] != Tok::RBracket {
        return Err(err(format!(
            "{input:?}: value filter is not closed with \"]\""
        )));
    }
    let mut p = Parser {
        toks: rest[1..body_end - 1].to_vec(),
        pos: 0,
        depth: 0,
        terms: 0,
        err,
    };
    let filter = p.or_expr(true)?;
    if let Some(t) = p.peek() {
        return Err(err(format!("unexpected {t} in value filter")));
    }
    Ok(PatchPath {
        attr,
        filter: Some(filter),
        sub_after_filter,
    })
}

/// Parse `attributes` / `excludedAttributes` / `sortBy`: comma-separated attribute paths.
/// Errors are `invalidValue`: these are not filters.
pub fn parse_attr_list(s: &str) -> ScimResult<Vec<AttrPath>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut path = parse_attr_path(p, ScimError::invalid_value)?;
            path.qualify();
            Ok(path)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Evaluation

fn get_ci<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// Where a path's attribute is defined, for case sensitivity and type.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    kind: ResourceKind,
    /// Inside `attr[...]`: the multi-valued parent.
    parent: Option<&'a AttrPath>,
}

struct Semantics {
    case_exact: bool,
    kind: Option<AttrKind>,
}

/// A user created without `active` is active to the roster, the status counts and the
/// exports; `active eq true` finds it too, so an IdP or a reconciler counting active users
/// over SCIM gets the figure the Roster API gives.
static ACTIVE_WHEN_UNASSIGNED: Value = Value::Bool(true);

impl Ctx<'_> {
    /// The top-level core `active` of a User.
    fn is_user_active(&self, path: &AttrPath) -> bool {
        self.parent.is_none()
            && self.kind == ResourceKind::User
            && path.sub.is_none()
            && path.attr.eq_ignore_ascii_case("active")
            && path.urn.as_deref().is_none_or(is_core_urn)
    }

    fn semantics(&self, path: &AttrPath) -> Semantics {
        let def = match self.parent {
            Some(p) => schema::lookup(self.kind, p.urn.as_deref(), &p.attr, Some(&path.attr)),
            None => schema::lookup(
                self.kind,
                path.urn.as_deref(),
                &path.attr,
                path.sub.as_deref(),
            )
            .or_else(|| {
                // `emails eq "x"` means the `value` sub-attribute (RFC 7644 §3.4.2.2).
                schema::lookup(self.kind, path.urn.as_deref(), &path.attr, Some("value"))
                    .filter(|_| path.sub.is_none())
            }),
        };
        let id_like = path.sub.is_none()
            && self.parent.is_none()
            && (path.attr.eq_ignore_ascii_case("id")
                || path.attr.eq_ignore_ascii_case("externalId"));
        Semantics {
            case_exact: def.map(|d| d.case_exact).unwrap_or(id_like),
            kind: def.map(|d| d.kind),
        }
    }
}

/// Every value `path` reaches in `doc`, flattening multi-valued attributes. A complex
/// value reached without a sub-attribute stands for its `value` sub-attribute, if it has
/// one.
fn resolve<'a>(ctx: Ctx<'_>, doc: &'a Value, path: &AttrPath) -> Vec<&'a Value> {
    resolve_with_gaps(ctx, doc, path).0
}

/// [`resolve`], and whether an element of the attribute lacks the sub-attribute named
/// (an email without a `type`): `ne` holds of such an element.
fn resolve_with_gaps<'a>(ctx: Ctx<'_>, doc: &'a Value, path: &AttrPath) -> (Vec<&'a Value>, bool) {
    let Some(obj) = doc.as_object() else {
        return (Vec::new(), false);
    };
    let base = match path.urn.as_deref() {
        Some(u) if ctx.parent.is_none() && !is_core_urn(u) => match get_ci(obj, u) {
            Some(Value::Object(ext)) => ext,
            _ => return (Vec::new(), false),
        },
        _ => obj,
    };
    let Some(top) = get_ci(base, &path.attr) else {
        return (Vec::new(), false);
    };
    let mut out = Vec::new();
    let mut gap = false;
    let mut push = |v: &'a Value| match (&path.sub, v) {
        (Some(s), Value::Object(o)) => match get_ci(o, s) {
            Some(Value::Array(xs)) => out.extend(xs.iter()),
            Some(x) => out.push(x),
            None => gap = true,
        },
        (Some(_), _) => {}
        // One without a `value` (`name`, an address) stands for itself: `name pr` is
        // true when any part of the name is there (RFC 7644 §3.4.2.2), and no
        // comparison matches an object.
        (None, Value::Object(o)) => out.push(get_ci(o, "value").unwrap_or(v)),
        (None, v) => out.push(v),
    };
    match top {
        Value::Array(items) => items.iter().for_each(&mut push),
        v => push(v),
    }
    (out, gap)
}

pub(crate) fn present(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        // "a non-empty node for complex attributes" (RFC 7644 §3.4.2.2): a name of
        // one empty givenName is not there.
        Value::Object(o) => o.values().any(present),
        _ => true,
    }
}

/// A SCIM dateTime (RFC 7643 §2.3.5 is xsd:dateTime, whose zone is optional): RFC 3339,
/// or without a zone (read as UTC), or with a zone written `+0000`.
pub(crate) fn parse_datetime(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|n| n.and_utc().fixed_offset())
        })
}

fn compare_one(sem: &Semantics, op: CompareOp, actual: &Value, expected: &Value) -> bool {
    use CompareOp::*;
    match (actual, expected) {
        (Value::String(a), Value::String(e)) => {
            if sem.kind == Some(AttrKind::DateTime)
                && let (Some(a), Some(e)) = (parse_datetime(a), parse_datetime(e))
            {
                return ordered(op, a.cmp(&e));
            }
            let (a, e) = if sem.case_exact {
                (a.clone(), e.clone())
            } else {
                (a.to_lowercase(), e.to_lowercase())
            };
            match op {
                Eq => a == e,
                Ne => a != e,
                Co => a.contains(&e),
                Sw => a.starts_with(&e),
                Ew => a.ends_with(&e),
                _ => ordered(op, a.cmp(&e)),
            }
        }
        (Value::Number(a), Value::Number(e)) => match (a.as_f64(), e.as_f64()) {
            (Some(a), Some(e)) => a.partial_cmp(&e).is_some_and(|o| ordered(op, o)),
            _ => false,
        },
        // Identity providers send booleans as strings ("False"); compare by meaning.
        (Value::Bool(a), Value::Bool(e)) => bool_op(op, *a, *e),
        (Value::Bool(a), Value::String(e)) => match e.to_ascii_lowercase().as_str() {
            "true" => bool_op(op, *a, true),
            "false" => bool_op(op, *a, false),
            _ => false,
        },
        (Value::String(a), Value::Bool(e)) => match a.to_ascii_lowercase().as_str() {
            "true" => bool_op(op, true, *e),
            "false" => bool_op(op, false, *e),
            _ => false,
        },
        (Value::String(a), Value::Number(e)) => match (a.parse::<f64>(), e.as_f64()) {
            (Ok(a), Some(e)) => a.partial_cmp(&e).is_some_and(|o| ordered(op, o)),
            _ => false,
        },
        _ => false,
    }
}

fn bool_op(op: CompareOp, a: bool, e: bool) -> bool {
    match op {
        CompareOp::Eq => a == e,
        CompareOp::Ne => a != e,
        // Booleans have no order and no substrings (RFC 7644 §3.4.2.2).
        _ => false,
    }
}

fn ordered(op: CompareOp, o: Ordering) -> bool {
    match op {
        CompareOp::Eq => o == Ordering::Equal,
        CompareOp::Ne => o != Ordering::Equal,
        CompareOp::Gt => o == Ordering::Greater,
        CompareOp::Ge => o != Ordering::Less,
        CompareOp::Lt => o == Ordering::Less,
        CompareOp::Le => o != Ordering::Greater,
        CompareOp::Co | CompareOp::Sw | CompareOp::Ew => false,
    }
}

impl Filter {
    /// Qualify the attribute paths outside value filters (inside one, names are the
    /// parent's sub-attributes).
    fn qualify(&mut self) {
        match self {
            Filter::Compare { path, .. }
            | Filter::Present(path)
            | Filter::ValuePath { path, .. } => path.qualify(),
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.qualify();
                b.qualify();
            }
            Filter::Not(f) => f.qualify(),
        }
    }

    /// The first attribute path the filter compares or tests for presence for which
    /// `known` says no. Inside a value filter (`emails[type eq "work"]`) each name is
    /// asked as a sub-attribute of the outer one (`emails.type`), and returned so.
    pub fn unknown_attr(&self, known: &dyn Fn(&AttrPath) -> bool) -> Option<AttrPath> {
        match self {
            Filter::Compare { path, .. } | Filter::Present(path) => {
                (!known(path)).then(|| path.clone())
            }
            Filter::ValuePath { path, filter } => {
                if !known(path) {
                    return Some(path.clone());
                }
                filter
                    .unknown_attr(&|p| known(&sub_of(path, p)))
                    .map(|p| sub_of(path, &p))
            }
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.unknown_attr(known).or_else(|| b.unknown_attr(known))
            }
            Filter::Not(f) => f.unknown_attr(known),
        }
    }

    /// Every comparison in the filter: the attribute (a value filter's names as
    /// sub-attributes of its attribute, as in `unknown_attr`), the operator and the value.
    pub fn comparisons(&self) -> Vec<(AttrPath, CompareOp, &Value)> {
        match self {
            Filter::Compare { path, op, value } => vec![(path.clone(), *op, value)],
            Filter::Present(_) => vec![],
            Filter::ValuePath { path, filter } => filter
                .comparisons()
                .into_iter()
                .map(|(p, op, v)| (sub_of(path, &p), op, v))
                .collect(),
            Filter::And(a, b) | Filter::Or(a, b) => {
                let mut out = a.comparisons();
                out.extend(b.comparisons());
                out
            }
            Filter::Not(f) => f.comparisons(),
        }
    }

    /// Does `resource` (a stored SCIM resource of `kind`) match?
    pub fn matches(&self, kind: ResourceKind, resource: &Value) -> bool {
        self.eval(Ctx { kind, parent: None }, resource)
    }

    /// Does one element of the multi-valued (or single complex) attribute `parent` match?
    /// Names in the filter are `parent`'s sub-attributes.
    pub fn matches_element(&self, kind: ResourceKind, parent: &AttrPath, element: &Value) -> bool {
        self.eval(
            Ctx {
                kind,
                parent: Some(parent),
            },
            element,
        )
    }

    fn eval(&self, ctx: Ctx<'_>, doc: &Value) -> bool {
        match self {
            Filter::And(a, b) => a.eval(ctx, doc) && b.eval(ctx, doc),
            Filter::Or(a, b) => a.eval(ctx, doc) || b.eval(ctx, doc),
            Filter::Not(a) => !a.eval(ctx, doc),
            Filter::Present(p) => resolve(ctx, doc, p).into_iter().any(present),
            Filter::Compare { path, op, value } => {
                let (values, gap) = resolve_with_gaps(ctx, doc, path);
                if value.is_null() {
                    let any = values.iter().any(|v| present(v));
                    return match op {
                        CompareOp::Eq => !any,
                        CompareOp::Ne => any,
                        _ => false,
                    };
                }
                let mut values = values;
                if values.is_empty() && ctx.is_user_active(path) {
                    values.push(&ACTIVE_WHEN_UNASSIGNED);
                }
                let sem = ctx.semantics(path);
                if *op == CompareOp::Ne {
                    // Absent, nothing equals. Otherwise any value that differs matches,
                    // as for every operator on a multi-valued attribute (RFC 7644
                    // §3.4.2.2): `emails.type ne "work"` holds of a user with a work and a
                    // home address, as `emails[type ne "work"]` does. It was read as "no
                    // value equals", and the two spellings selected different users.
                    return values.is_empty()
                        || gap
                        || values
                            .iter()
                            .any(|v| !compare_one(&sem, CompareOp::Eq, v, value));
                }
                values.iter().any(|v| compare_one(&sem, *op, v, value))
            }
            Filter::ValuePath { path, filter } => {
                let Some(obj) = doc.as_object() else {
                    return false;
                };
                let base = match path.urn.as_deref() {
                    Some(u) if !is_core_urn(u) => match get_ci(obj, u) {
                        Some(Value::Object(ext)) => ext,
                        _ => return false,
                    },
                    _ => obj,
                };
                let inner = Ctx {
                    kind: ctx.kind,
                    parent: Some(path),
                };
                match get_ci(base, &path.attr) {
                    Some(Value::Array(items)) => items.iter().any(|e| filter.eval(inner, e)),
                    Some(v @ Value::Object(_)) => filter.eval(inner, v),
                    _ => false,
                }
            }
        }
    }

    /// The attribute paths the filter names at its top level (a value filter counts as
    /// its outer attribute).
    pub fn attr_paths(&self) -> Vec<&AttrPath> {
        let mut out = Vec::new();
        self.collect_paths(&mut out);
        out
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<&'a AttrPath>) {
        match self {
            Filter::Compare { path, .. } | Filter::Present(path) => out.push(path),
            Filter::ValuePath { path, .. } => out.push(path),
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.collect_paths(out);
                b.collect_paths(out);
            }
            Filter::Not(a) => a.collect_paths(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::error::ScimType;
    use serde_json::json;

    fn user() -> Value {
        json!({
            "schemas": [USER_SCHEMA, ENTERPRISE_USER_SCHEMA],
            "id": "2819c223-7f76-453a-919d-413861904646",
            "externalId": "Ext-1",
            "userName": "Bjensen@Example.com",
            "name": {"familyName": "Jensen", "givenName": "Barbara"},
            "title": "Tour Guide",
            "active": true,
            "emails": [
                {"value": "bjensen@example.com", "type": "work", "primary": true},
                {"value": "babs@jensen.org", "type": "home"}
            ],
            "meta": {"resourceType": "User", "lastModified": "2011-05-13T04:42:34Z",
                     "created": "2010-01-23T04:56:22Z"},
            ENTERPRISE_USER_SCHEMA: {"employeeNumber": "701984", "department": "Tour Operations",
                                     "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d"}},
            "x-score": 42
        })
    }

    fn m(f: &str) -> bool {
        parse_filter(f)
            .unwrap_or_else(|e| panic!("{f}: {e:?}"))
            .matches(ResourceKind::User, &user())
    }

    #[test]
    fn operators_on_strings() {
        assert!(
            m(r#"userName eq "bjensen@example.com""#),
            "userName is not caseExact"
        );
        assert!(m(r#"USERNAME Eq "BJENSEN@EXAMPLE.COM""#));
        assert!(!m(r#"userName ne "bjensen@example.com""#));
        assert!(m(r#"name.familyName co "ens""#));
        assert!(m(r#"name.familyName sw "J""#));
        assert!(m(r#"name.familyName ew "sen""#));
        assert!(m(r#"title gt "A""#));
        assert!(m(r#"title lt "z""#));
        assert!(m(r#"title ge "tour guide""#));
        assert!(m(r#"title le "tour guide""#));
        assert!(!m(r#"title gt "tour guide""#));
    }

    #[test]
    fn a_user_without_active_compares_as_active() {
        let mut u = user();
        u.as_object_mut().unwrap().remove("active");
        let on = |kind, doc: &Value, f: &str| parse_filter(f).unwrap().matches(kind, doc);
        assert!(on(ResourceKind::User, &u, "active eq true"));
        assert!(on(ResourceKind::User, &u, "active ne false"));
        assert!(!on(ResourceKind::User, &u, "active eq false"));
        assert!(on(
            ResourceKind::User,
            &u,
            "urn:ietf:params:scim:schemas:core:2.0:User:active eq true"
        ));
        // Presence is about what was sent.
        assert!(!on(ResourceKind::User, &u, "active pr"));
        // Only a User has `active`.
        assert!(!on(
            ResourceKind::Group,
            &json!({"displayName": "g"}),
            "active eq true"
        ));
        let mut off = user();
        off["active"] = json!(false);
        assert!(!on(ResourceKind::User, &off, "active eq true"));
    }

    #[test]
    fn case_exact_attributes_compare_exactly() {
        assert!(m(r#"externalId eq "Ext-1""#));
        assert!(!m(r#"externalId eq "ext-1""#), "externalId is caseExact");
        assert!(!m(r#"id eq "2819C223-7F76-453A-919D-413861904646""#));
    }

    #[test]
    fn presence_boolean_number_datetime() {
        assert!(m("title pr"));
        assert!(!m("nickName pr"));
        // A complex attribute without `value` is present when any part of it is.
        assert!(m("name pr"));
        assert!(!m("addresses pr"));
        let mut with_address = user();
        with_address["addresses"] = json!([{"locality": "Oslo", "type": "work"}]);
        assert!(
            parse_filter("addresses pr")
                .unwrap()
                .matches(ResourceKind::User, &with_address)
        );
        assert!(
            !m(r#"name eq "Barbara Jensen""#),
            "no comparison matches an object"
        );
        assert!(m("active eq true"));
        assert!(m(r#"active eq "True""#), "booleans sent as strings");
        assert!(!m("active eq false"));
        assert!(!m("active gt false"), "booleans have no order");
        assert!(m("x-score gt 41.5"));
        assert!(!m("x-score lt 42"));
        assert!(m(r#"meta.lastModified gt "2011-05-13T00:00:00Z""#));
        // Same instant in another offset: compared as time, not text.
        assert!(m(r#"meta.lastModified eq "2011-05-13T06:42:34+02:00""#));
        assert!(!m(r#"meta.lastModified lt "2011-05-13T04:42:34Z""#));
        // xsd:dateTime's zone is optional (none is UTC here), and some write +0000.
        assert!(m(r#"meta.lastModified eq "2011-05-13T04:42:34""#));
        assert!(m(r#"meta.lastModified eq "2011-05-13T05:42:34.000+0100""#));
    }

    #[test]
    fn multi_valued_and_value_paths() {
        assert!(m(r#"emails eq "babs@jensen.org""#));
        assert!(m(r#"emails.value co "example.com""#));
        assert!(m(r#"emails[type eq "work" and value co "@example.com"]"#));
        assert!(!m(r#"emails[type eq "home" and value co "@example.com"]"#));
        assert!(m(r#"emails[type eq "home"] and userName sw "bj""#));
        assert!(m(r#"emails.type eq "home""#));
        assert!(m(r#"emails[not (type eq "work")]"#));
        // Entra's matching filter: a sub-attribute compared after the value filter.
        assert!(m(
            r#"emails[type eq "work"].value eq "bjensen@example.com""#
        ));
        assert!(!m(
            r#"emails[type eq "home"].value eq "bjensen@example.com""#
        ));
        assert!(m(r#"emails[type eq "work"].value pr and userName sw "bj""#));
    }

    #[test]
    fn urn_qualified_names() {
        assert!(m(&format!(
            r#"{ENTERPRISE_USER_SCHEMA}:employeeNumber eq "701984""#
        )));
        assert!(m(&format!(
            r#"{}:manager.value eq "26118915-6090-4610-87e4-49d8ca9f808d""#,
            ENTERPRISE_USER_SCHEMA.to_lowercase()
        )));
        assert!(m(&format!(r#"{USER_SCHEMA}:name.givenName eq "barbara""#)));
        // Unqualified, an attribute only the extension has is the extension's (RFC 7644
        // §3.10: SHOULD qualify).
        assert!(m(r#"employeeNumber eq "701984""#));
        assert!(!m(r#"employeeNumber eq "701985""#));
        let f = parse_filter(r#"department eq "x" and emails[type eq "work"]"#).unwrap();
        let paths: Vec<String> = f.attr_paths().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            paths,
            [
                format!("{ENTERPRISE_USER_SCHEMA}:department"),
                "emails".into()
            ],
            "the value filter's names stay the parent's sub-attributes"
        );
    }

    #[test]
    fn precedence_and_grouping() {
        // and binds tighter than or: true or (false and false) is true.
        assert!(m(r#"title pr or nickName pr and userName eq "x""#));
        // (true or false) and false is false.
        assert!(!m(r#"(title pr or nickName pr) and userName eq "x""#));
        assert!(m(r#"not (userName eq "x") and not(nickName pr)"#));
        let f = parse_filter(r#"a eq 1 or b eq 2 and c eq 3"#).unwrap();
        assert!(matches!(f, Filter::Or(_, ref r) if matches!(**r, Filter::And(..))));
    }

    #[test]
    fn a_complex_value_of_empty_parts_is_not_present() {
        let f = parse_filter("name pr").unwrap();
        let doc = |name: Value| json!({"userName": "u", "name": name});
        assert!(f.matches(ResourceKind::User, &doc(json!({"givenName": "A"}))));
        for empty in [
            json!({"givenName": ""}),
            json!({}),
            json!({"givenName": null}),
        ] {
            assert!(
                !f.matches(ResourceKind::User, &doc(empty.clone())),
                "{empty}"
            );
        }
    }

    #[test]
    fn ne_and_null() {
        assert!(m(r#"nickName ne "x""#), "absent is not equal");
        assert!(m("nickName eq null"));
        assert!(!m("title eq null"));
    }

    /// On a multi-valued attribute `ne` matches when any value differs (RFC 7644
    /// §3.4.2.2), in either spelling.
    #[test]
    fn ne_on_a_multi_valued_attribute_is_any_value_differing() {
        for f in [r#"emails.type ne "work""#, r#"emails[type ne "work"]"#] {
            assert!(m(f), "the home address differs: {f}");
        }
        assert!(!m(r#"userName ne "bjensen@example.com""#));
        let both_work = json!({"emails": [
            {"value": "a@x.test", "type": "work"}, {"value": "b@x.test", "type": "work"}]});
        let untyped = json!({"emails": [
            {"value": "a@x.test", "type": "work"}, {"value": "b@x.test"}]});
        for f in [r#"emails.type ne "work""#, r#"emails[type ne "work"]"#] {
            let f = parse_filter(f).unwrap();
            assert!(!f.matches(ResourceKind::User, &both_work), "{f}");
            assert!(
                f.matches(ResourceKind::User, &untyped),
                "no type is not work: {f}"
            );
        }
    }

    #[test]
    fn string_escapes() {
        let f = parse_filter(r#"title eq "a \"quoted\" \u00e9""#).unwrap();
        assert_eq!(
            f,
            Filter::Compare {
                path: AttrPath::simple("title"),
                op: CompareOp::Eq,
                value: json!("a \"quoted\" é"),
            }
        );
    }

    #[test]
    fn bad_filters_are_invalid_filter() {
        for bad in [
            "",
            "userName",
            "userName eq",
            r#"userName xx "a""#,
            r#"userName eq "unterminated"#,
            r#"(userName eq "a""#,
            r#"userName eq "a")"#,
            r#"emails[type eq "work""#,
            r#"emails[type[value eq "x"]]"#,
            r#"userName eq bareword"#,
            r#"userName eq "a" and"#,
            "@@",
            r#"1abc eq "x""#,
        ] {
            let e = parse_filter(bad).expect_err(bad);
            assert_eq!(e.scim_type, Some(ScimType::InvalidFilter), "{bad}");
            assert_eq!(e.status, 400);
        }
        let e = parse_filter(r#"not userName eq "x""#).unwrap_err();
        assert!(e.detail.contains("in parentheses"), "{}", e.detail);
        assert!(parse_filter(r#"not (userName eq "x")"#).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!("{}title pr{}", "(".repeat(10_000), ")".repeat(10_000));
        assert_eq!(
            parse_filter(&deep).unwrap_err().scim_type,
            Some(ScimType::InvalidFilter)
        );
        let nots = format!("{}title pr{}", "not (".repeat(5_000), ")".repeat(5_000));
        assert!(parse_filter(&nots).is_err());
        let ok = format!("{}title pr{}", "(".repeat(20), ")".repeat(20));
        assert!(m(&ok));
        // `not (` is one level, as `(` is: 63 of them (and the comparison) fit in 64.
        let nots = |n: usize| format!("{}title pr{}", "not (".repeat(n), ")".repeat(n));
        assert!(parse_filter(&nots(63)).is_ok());
        assert!(parse_filter(&format!("{}title pr{}", "(".repeat(63), ")".repeat(63))).is_ok());
        assert!(parse_filter(&nots(64)).is_err());
    }

    #[test]
    fn patch_paths() {
        let p = parse_path(r#"emails[type eq "work"].value"#).unwrap();
        assert_eq!(p.attr, AttrPath::simple("emails"));
        assert_eq!(p.sub_after_filter.as_deref(), Some("value"));
        assert!(p.filter.is_some());

        let p = parse_path(r#"members[value eq "2819c223"]"#).unwrap();
        assert_eq!(p.attr.attr, "members");
        assert!(p.sub_after_filter.is_none());

        let p = parse_path("name.givenName").unwrap();
        assert_eq!(p.attr.sub.as_deref(), Some("givenName"));

        let p = parse_path(&format!("{ENTERPRISE_USER_SCHEMA}:manager")).unwrap();
        assert_eq!(p.attr.urn.as_deref(), Some(ENTERPRISE_USER_SCHEMA));
        assert_eq!(p.attr.attr, "manager");

        let p = parse_path(ENTERPRISE_USER_SCHEMA).unwrap();
        assert!(p.attr.is_whole_schema());

        for bad in [
            "",
            "emails[",
            "emails]",
            r#"emails[type eq "w"]x"#,
            "a b",
            "name.given.x",
        ] {
            let e = parse_path(bad).expect_err(bad);
            assert_eq!(e.scim_type, Some(ScimType::InvalidPath), "{bad}");
        }
    }

    #[test]
    fn attr_lists() {
        let l = parse_attr_list(&format!(
            "userName, name.familyName,{ENTERPRISE_USER_SCHEMA}:department"
        ))
        .unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].sub.as_deref(), Some("familyName"));
        assert_eq!(l[2].attr, "department");
        let e = parse_attr_list("userName,(bad").unwrap_err();
        assert_eq!(e.scim_type, Some(ScimType::InvalidValue));
    }

    #[test]
    fn display_round_trips() {
        // A chain of more terms than MAX_DEPTH is one level deep, and printed so too.
        let long_or = vec!["title pr"; 200].join(" or ");
        let long_and = vec!["title pr"; 200].join(" and ");
        for f in [
            r#"userName eq "a" or (title pr and not (active eq false))"#,
            r#"emails[type eq "work" and value co "@x"]"#,
            r#"a pr or (b pr or c pr) or d pr and e pr and (f pr or g pr)"#,
            &long_or,
            &long_and,
        ] {
            let parsed = parse_filter(f).unwrap();
            let printed = parsed.to_string();
            assert_eq!(parse_filter(&printed).unwrap(), parsed, "{printed}");
        }
        assert_eq!(
            parse_filter("a pr or b pr or c pr and d pr")
                .unwrap()
                .to_string(),
            "(a pr or b pr or (c pr and d pr))"
        );
    }

    /// Attribute lists reach the path parser untokenized: a name with a multi-byte
    /// character across its fourth byte was cut there, and panicked.
    #[test]
    fn a_non_ascii_attribute_name_is_refused_not_cut() {
        for list in [
            "abc\u{e9}",
            "urn:   \u{2000}. ",
            "ur\u{2000}\u{2}",
            "abc\u{e9},userName",
        ] {
            let e = parse_attr_list(list).unwrap_err();
            assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{list:?}");
        }
    }

    #[test]
    fn attr_paths_are_top_level() {
        let f = parse_filter(r#"members[value eq "x"] or displayName pr"#).unwrap();
        let names: Vec<_> = f.attr_paths().iter().map(|p| p.attr.clone()).collect();
        assert_eq!(names, ["members", "displayName"]);
    }
}
