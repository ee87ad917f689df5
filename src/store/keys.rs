//! Key layout inside one tenant's tree. Every key starts with a one-byte family tag.
//! Ids are server-assigned UUIDs (36 bytes), always the last component, so index keys can be
//! split even when an indexed value contains the separator byte.

use crate::scim::ResourceKind;

pub(crate) const ID_LEN: usize = 36;
const SEP: u8 = 0;

/// Singletons live under `s`: sequence counters, the redo record, the policy fingerprint
/// and the family counters of `counts.rs`.
pub(crate) const SEQ_KEY: &[u8] = b"s\0seq";

fn kind_tag(kind: ResourceKind) -> u8 {
    match kind {
        ResourceKind::User => b'U',
        ResourceKind::Group => b'G',
    }
}

/// `r U id` → resource document.
pub(crate) fn resource(kind: ResourceKind, id: &str) -> Vec<u8> {
    let mut k = resource_prefix(kind);
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn resource_prefix(kind: ResourceKind) -> Vec<u8> {
    vec![b'r', SEP, kind_tag(kind), SEP]
}

/// Secondary indexes. `Unique` families map value → id; the others hold `value SEP id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Index {
    /// User userName, lower-cased: unique per tenant.
    UserName,
    UserExternalId,
    GroupExternalId,
    /// Every email value, lower-cased.
    Email,
    /// Enterprise manager.value.
    Manager,
    /// Enterprise department, lower-cased.
    Department,
    /// Group displayName, lower-cased.
    GroupName,
    /// Users with `active: false` (value empty), so status can count them without a scan.
    Inactive,
}

impl Index {
    fn tag(self) -> &'static [u8] {
        match self {
            Index::UserName => b"un",
            Index::UserExternalId => b"ux",
            Index::GroupExternalId => b"gx",
            Index::Email => b"em",
            Index::Manager => b"mg",
            Index::Department => b"dp",
            Index::GroupName => b"gn",
            Index::Inactive => b"in",
        }
    }

    pub(crate) fn is_unique(self) -> bool {
        matches!(self, Index::UserName)
    }
}

/// `v id` → the seq (8 bytes, big-endian) of the change that last reactivated user `id`.
pub(crate) fn reactivated(id: &str) -> Vec<u8> {
    let mut k = vec![b'v', SEP];
    k.extend_from_slice(id.as_bytes());
    k
}

/// For unique indexes the whole key; for the others the prefix to scan for `value`.
pub(crate) fn index_prefix(index: Index, value: &str) -> Vec<u8> {
    let mut k = vec![b'i', SEP];
    k.extend_from_slice(index.tag());
    k.push(SEP);
    k.extend_from_slice(value.as_bytes());
    if !index.is_unique() {
        k.push(SEP);
    }
    k
}

pub(crate) fn index_entry(index: Index, value: &str, id: &str) -> Vec<u8> {
    let mut k = index_prefix(index, value);
    if !index.is_unique() {
        k.extend_from_slice(id.as_bytes());
    }
    k
}

/// What an index entry stores: the id for unique families (the key ends at the value),
/// nothing for the others (the id ends the key).
pub(crate) fn index_value(index: Index, id: &str) -> Vec<u8> {
    if index.is_unique() {
        id.as_bytes().to_vec()
    } else {
        Vec::new()
    }
}

/// `m gid mid` → member record (forward membership).
pub(crate) fn member(group: &str, member: &str) -> Vec<u8> {
    let mut k = members_prefix(group);
    k.extend_from_slice(member.as_bytes());
    k
}

pub(crate) fn members_prefix(group: &str) -> Vec<u8> {
    let mut k = vec![b'm', SEP];
    k.extend_from_slice(group.as_bytes());
    k.push(SEP);
    k
}

/// `b mid gid` → empty (reverse membership: the groups a resource belongs to).
pub(crate) fn backref(member: &str, group: &str) -> Vec<u8> {
    let mut k = backrefs_prefix(member);
    k.extend_from_slice(group.as_bytes());
    k
}

pub(crate) fn backrefs_prefix(member: &str) -> Vec<u8> {
    let mut k = vec![b'b', SEP];
    k.extend_from_slice(member.as_bytes());
    k.push(SEP);
    k
}

/// The member and group ids of a [`backref`] key; `None` if `key` is not one.
pub(crate) fn backref_parts(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = key.strip_prefix(&[b'b', SEP][..])?;
    Some((rest.get(..ID_LEN)?, rest.get(ID_LEN + 1..)?))
}

/// `c seq` → change event, big-endian so the log iterates in order.
pub(crate) fn change(seq: u64) -> Vec<u8> {
    let mut k = changes_prefix();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn changes_prefix() -> Vec<u8> {
    vec![b'c', SEP]
}

/// The id at the end of a non-unique index, membership or backref key.
pub(crate) fn trailing_id(key: &[u8], prefix_len: usize) -> Option<&str> {
    if key.len() != prefix_len + ID_LEN {
        return None;
    }
    std::str::from_utf8(&key[prefix_len..]).ok()
}

/// `a id` → the user's archetype assignment.
pub(crate) fn assignment(id: &str) -> Vec<u8> {
    let mut k = vec![b'a', SEP];
    k.extend_from_slice(id.as_bytes());
    k
}

/// `p id` → the user's roster record (see `record.rs`).
pub(crate) fn record(id: &str) -> Vec<u8> {
    let mut k = vec![b'p', SEP];
    k.extend_from_slice(id.as_bytes());
    k
}

/// `n userName` → SCIM id (userName lower-cased) and `N id` → userName: users deleted
/// once they had an assignment, so their governance history stays reachable, and named,
/// after the user is gone.
pub(crate) fn departed_by_name(user_name: &str) -> Vec<u8> {
    let mut k = vec![b'n', SEP];
    k.extend_from_slice(user_name.to_lowercase().as_bytes());
    k
}

pub(crate) fn departed_by_id(id: &str) -> Vec<u8> {
    let mut k = vec![b'N', SEP];
    k.extend_from_slice(id.as_bytes());
    k
}

/// `x archetype id` → empty: users by archetype.
pub(crate) fn archetype_entry(archetype: &str, id: &str) -> Vec<u8> {
    let mut k = archetype_prefix(archetype);
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn archetype_prefix(archetype: &str) -> Vec<u8> {
    let mut k = vec![b'x', SEP];
    k.extend_from_slice(archetype.as_bytes());
    k.push(SEP);
    k
}

/// `q id` → empty: the review queue.
pub(crate) fn review(id: &str) -> Vec<u8> {
    let mut k = review_prefix();
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn review_prefix() -> Vec<u8> {
    vec![b'q', SEP]
}

pub(crate) const GSEQ_KEY: &[u8] = b"s\0gseq";

/// `s skipped` → the change numbers restores skipped, as pairs of big-endian u64s
/// (see `restored.rs`).
pub(crate) const SKIPPED_KEY: &[u8] = b"s\0skipped";

/// `g seq` → governance event, big-endian so events iterate in order.
pub(crate) fn governance(seq: u64) -> Vec<u8> {
    let mut k = vec![b'g', SEP];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Every governance event's key, in order.
pub(crate) fn governance_all() -> std::ops::RangeInclusive<Vec<u8>> {
    governance(0)..=governance(u64::MAX)
}

/// `e user seq` → empty: one user's governance events, in order.
pub(crate) fn governance_of_user(user: &str, seq: u64) -> Vec<u8> {
    event_index_entry(governance_of_user_prefix(user), seq)
}

pub(crate) fn governance_of_user_prefix(user: &str) -> Vec<u8> {
    event_index_prefix(b'e', user)
}

/// `f kind seq` → empty: the governance events of one kind, in order (for the kinds
/// `roster::kind_indexed` admits).
pub(crate) fn governance_of_kind(kind: &str, seq: u64) -> Vec<u8> {
    event_index_entry(governance_of_kind_prefix(kind), seq)
}

pub(crate) fn governance_of_kind_prefix(kind: &str) -> Vec<u8> {
    event_index_prefix(b'f', kind)
}

fn event_index_prefix(tag: u8, value: &str) -> Vec<u8> {
    let mut k = vec![tag, SEP];
    k.extend_from_slice(value.as_bytes());
    k.push(SEP);
    k
}

/// Big-endian, so a value's events iterate in sequence order.
fn event_index_entry(mut prefix: Vec<u8>, seq: u64) -> Vec<u8> {
    prefix.extend_from_slice(&seq.to_be_bytes());
    prefix
}

/// `j job-id` → job record.
pub(crate) fn job(id: &str) -> Vec<u8> {
    let mut k = jobs_prefix();
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn jobs_prefix() -> Vec<u8> {
    vec![b'j', SEP]
}

/// The redo record of the transaction being applied (see `apply_ops`).
pub(crate) const INTENT_KEY: &[u8] = b"s\0intent";

/// The token of the export row file's last clean close (see `rows.rs`).
pub(crate) const ROWS_TOKEN_KEY: &[u8] = b"s\0rows-token";

/// Prefix of every backref key (all members' group lists, in member order).
pub(crate) fn backrefs_all_prefix() -> Vec<u8> {
    vec![b'b', SEP]
}
