//! The roster row of each user: the fields the Roster API lists, filters and exports, as
//! one compact binary record (`p id`) beside the SCIM document and the assignment.
//!
//! A walk of the roster (the CSV export, an unindexed list) used to decode the whole
//! stored document and assignment of every user: about 900 bytes of JSON each, which at
//! a million users outgrows the page cache and spends its time in the JSON parser. The
//! record is about 150 bytes and decodes without copying. It is derived data: every
//! transaction that writes a user's document or assignment rewrites it in the same
//! atomic write ([`Txn::refresh_records`]), and opening an older data directory builds
//! it ([`build_all`]).
use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::roster::{Assignment, range_after};
use super::rows::Row;
use super::{ENTERPRISE_USER_SCHEMA, StoreError, StoreResult, Txn, index_entries, keys};
use crate::scim::ResourceKind;

/// One user as the roster sees it. Strings borrow from the stored bytes.
///
/// Stored with postcard, which writes a struct as its fields one after the other: the
/// bytes are those of `user` followed by those of `assignment`, so a transaction that
/// changes only one of them reuses the stored bytes of the other (see [`Parts`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterRecord<'a> {
    #[serde(borrow)]
    pub user: UserFields<'a>,
    /// Absent when the user has no assignment (the tenant has no archetype policy).
    #[serde(borrow)]
    pub assignment: Option<RecordAssignment<'a>>,
}

/// The part of a user's SCIM document the roster shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserFields<'a> {
    pub user_name: &'a str,
    /// The address shown: the primary one, else the work one, else the first, else a
    /// userName that looks like an address.
    #[serde(borrow)]
    pub email: Option<&'a str>,
    /// Every other email value, for the email filter.
    #[serde(borrow)]
    pub other_emails: Vec<&'a str>,
    /// Derived (see [`crate::scim::names`]): owned when taken from a full name, borrowed
    /// when read back, as postcard writes a string the same either way.
    #[serde(borrow)]
    pub given_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub family_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub title: Option<&'a str>,
    #[serde(borrow)]
    pub department: Option<&'a str>,
    /// SCIM id of the manager (enterprise `manager.value`).
    #[serde(borrow)]
    pub manager: Option<&'a str>,
    #[serde(borrow)]
    pub external_id: Option<&'a str>,
    pub active: bool,
}

/// The part of an [`Assignment`] the roster shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordAssignment<'a> {
    #[serde(borrow)]
    pub archetype_id: Option<&'a str>,
    pub confidence: f64,
    pub assigned_by: &'a str,
    /// `assigned_at` as Unix seconds and nanoseconds, exactly as the assignment has it.
    pub assigned_secs: i64,
    pub assigned_nanos: u32,
}

impl<'a> RecordAssignment<'a> {
    fn new(a: &'a Assignment) -> RecordAssignment<'a> {
        RecordAssignment {
            archetype_id: a.archetype_id.as_deref(),
            confidence: a.confidence,
            assigned_by: &a.assigned_by,
            assigned_secs: a.assigned_at.timestamp(),
            assigned_nanos: a.assigned_at.timestamp_subsec_nanos(),
        }
    }

    pub fn assigned_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.assigned_secs, self.assigned_nanos).unwrap_or_default()
    }
}

/// A non-empty string at `v`.
fn text(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.is_empty())
}

impl<'a> UserFields<'a> {
    /// The fields of a stored user document.
    fn new(doc: &'a Value) -> UserFields<'a> {
        let user_name = doc.get("userName").and_then(Value::as_str).unwrap_or("");
        let emails: Vec<&Value> = doc
            .get("emails")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        // The primary address, else a work one (`type` is not case-exact: Entra sends
        // "Work"), else the first; an entry with an empty value is no address.
        let usable: Vec<usize> = (0..emails.len())
            .filter(|&i| text(emails[i].get("value")).is_some())
            .collect();
        let is_work = |i: &usize| {
            emails[*i]
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("work"))
        };
        let shown = usable
            .iter()
            .copied()
            .find(|&i| crate::scim::resource::is_primary(emails[i]))
            .or_else(|| usable.iter().copied().find(is_work))
            .or_else(|| usable.first().copied());
        let email = shown
            .and_then(|i| text(emails[i].get("value")))
            .or_else(|| Some(user_name).filter(|u| u.contains('@')));
        let other_emails = emails
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != shown)
            .filter_map(|(_, e)| text(e.get("value")))
            .collect();
        let ext = doc.get(ENTERPRISE_USER_SCHEMA);
        UserFields {
            user_name,
            email,
            other_emails,
            given_name: crate::scim::names::given_name(doc),
            family_name: crate::scim::names::family_name(doc),
            title: text(doc.get("title")),
            department: text(ext.and_then(|e| e.get("department"))),
            manager: ext
                .and_then(|e| e.pointer("/manager/value"))
                .and_then(Value::as_str),
            external_id: text(doc.get("externalId")),
            active: doc.get("active").and_then(Value::as_bool).unwrap_or(true),
        }
    }

    /// Whether `address` is one of the user's emails, or a userName that is an address
    /// (people look a user up by their login), ignoring case as the email index does
    /// (full Unicode lowercasing, so a list never disagrees with its index).
    pub fn has_email(&self, address: &str) -> bool {
        let address = address.to_lowercase();
        let login = Some(self.user_name).filter(|u| u.contains('@'));
        self.email
            .iter()
            .chain(&self.other_emails)
            .chain(&login)
            .any(|e| e.to_lowercase() == address)
    }
}

impl<'a> RosterRecord<'a> {
    pub fn archetype_id(&self) -> Option<&'a str> {
        self.assignment.as_ref().and_then(|a| a.archetype_id)
    }

    pub fn confidence(&self) -> Option<f64> {
        self.assignment.as_ref().map(|a| a.confidence)
    }

    fn decode(bytes: &'a [u8]) -> StoreResult<RosterRecord<'a>> {
        postcard::from_bytes(bytes).map_err(corrupt)
    }
}

/// The archetype a stored record's user holds (if any) and whether they are active: what
/// the per-archetype counters count.
pub(super) fn holding(bytes: &[u8]) -> StoreResult<Option<(String, bool)>> {
    let r = RosterRecord::decode(bytes)?;
    Ok(r.assignment
        .and_then(|a| a.archetype_id)
        .map(|a| (a.to_owned(), r.user.active)))
}

/// Whether a stored record holds an assignment (with or without an archetype).
pub(super) fn assigned(bytes: &[u8]) -> StoreResult<bool> {
    Ok(RosterRecord::decode(bytes)?.assignment.is_some())
}

fn corrupt(e: postcard::Error) -> StoreError {
    StoreError::Corrupt(format!("unreadable roster record: {e}"))
}

fn encode<T: Serialize>(v: &T) -> StoreResult<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Backend(format!("roster record: {e}")))
}

/// The encoded halves of a record that a transaction has written so far: set by the
/// writes themselves, which hold the decoded document or assignment, so making the
/// record costs no JSON decoding.
#[derive(Debug, Default)]
pub(super) struct Parts {
    user: Option<Vec<u8>>,
    assignment: Option<Vec<u8>>,
}

/// The record's halves as stored: the split point is where `user` ends.
fn split(bytes: &[u8]) -> StoreResult<(&[u8], &[u8])> {
    let (_, rest) = postcard::take_from_bytes::<UserFields<'_>>(bytes).map_err(corrupt)?;
    Ok(bytes.split_at(bytes.len() - rest.len()))
}

/// A stored roster record and its user id, as read from the store; decode with
/// [`RecordBytes::record`], which borrows from it.
pub struct RecordBytes {
    id: sled::IVec,
    bytes: sled::IVec,
}

impl RecordBytes {
    pub fn id(&self) -> &str {
        // Ids are ASCII UUIDs the store wrote; anything else is not a user of ours.
        std::str::from_utf8(&self.id).unwrap_or("")
    }

    pub fn record(&self) -> StoreResult<RosterRecord<'_>> {
        RosterRecord::decode(&self.bytes)
    }
}

impl Txn<'_> {
    /// The user document this transaction saves for `id`.
    pub(super) fn record_user(&mut self, id: &str, doc: &Value) -> StoreResult<()> {
        let bytes = encode(&UserFields::new(doc))?;
        self.records.entry(id.to_owned()).or_default().user = Some(bytes);
        Ok(())
    }

    /// The assignment this transaction stores (or removes) for `id`.
    pub(super) fn record_assignment(
        &mut self,
        id: &str,
        a: Option<&Assignment>,
    ) -> StoreResult<()> {
        let bytes = encode(&a.map(RecordAssignment::new))?;
        self.records.entry(id.to_owned()).or_default().assignment = Some(bytes);
        Ok(())
    }

    /// Rewrite the roster record of every user whose document or assignment this
    /// transaction writes. The halves the writes handed over are used as they are; a
    /// missing half comes from the stored record, or, failing that, from the stored
    /// document or assignment. Every pending document and assignment key is covered, so
    /// a write path that forgot to hand over its half still gets a correct record.
    pub(super) fn refresh_records(&mut self) -> StoreResult<()> {
        let user_prefix = keys::resource_prefix(ResourceKind::User);
        let assignment_prefix = keys::assignment("");
        let mut ids: Vec<String> = self
            .pending
            .keys()
            .filter_map(|k| {
                k.strip_prefix(user_prefix.as_slice())
                    .or_else(|| k.strip_prefix(assignment_prefix.as_slice()))
            })
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut handed = std::mem::take(&mut self.records);
        for id in ids {
            let parts = handed.remove(&id).unwrap_or_default();
            let doc_key = keys::resource(ResourceKind::User, &id);
            if !self.exists(&doc_key)? {
                self.del(keys::record(&id));
                continue;
            }
            // Both halves handed over (a create, say): the stored record is not needed.
            let stored = if parts.user.is_some() && parts.assignment.is_some() {
                None
            } else {
                self.get(&keys::record(&id))?
            };
            let (stored_user, stored_assignment) = match &stored {
                Some(b) => {
                    let (u, a) = split(b)?;
                    (Some(u), Some(a))
                }
                None => (None, None),
            };
            let doc_pending = self.pending.contains_key(&doc_key);
            let assignment_pending = self.pending.contains_key(&keys::assignment(&id));
            let mut bytes = match (parts.user, stored_user) {
                (Some(u), _) => u,
                (None, Some(u)) if !doc_pending => u.to_vec(),
                _ => match self.load(ResourceKind::User, &id)? {
                    Some(doc) => encode(&UserFields::new(&doc))?,
                    None => continue,
                },
            };
            match (parts.assignment, stored_assignment) {
                (Some(a), _) => bytes.extend_from_slice(&a),
                (None, Some(a)) if !assignment_pending => bytes.extend_from_slice(a),
                _ => {
                    let a = self.load_assignment(&id)?;
                    bytes.extend_from_slice(&encode(&a.as_ref().map(RecordAssignment::new))?);
                }
            }
            self.put(keys::record(&id), bytes);
        }
        Ok(())
    }
}

impl super::Store {
    /// One user's roster record.
    pub fn roster_record(&self, tenant: &str, id: &str) -> StoreResult<Option<RecordBytes>> {
        let t = self.tenant(tenant)?;
        Ok(t.tree.get(keys::record(id))?.map(|bytes| RecordBytes {
            id: sled::IVec::from(id.as_bytes()),
            bytes,
        }))
    }

    /// Every user's roster record, in no particular order, until `f` returns false: the
    /// CSV export's walk. Read from the tenant's row file (see `rows.rs`), which stays
    /// out of sled's page cache, or from the tree if the file is not usable. `f` also
    /// gets the ids of the groups the user is a direct member of, when the file has them
    /// (`None`: ask [`Store::groups_of`]).
    pub fn for_each_record(
        &self,
        tenant: &str,
        mut f: impl FnMut(&str, &RosterRecord<'_>, Option<&[String]>) -> StoreResult<bool>,
    ) -> StoreResult<()> {
        let t = self.tenant(tenant)?;
        if let Some(rows) = &t.rows {
            let mut names: Vec<String> = Vec::new();
            let walked = rows.for_each(|row| match row {
                Row::Record { id, bytes, groups } => {
                    let groups = groups.map(|packed| {
                        names.clear();
                        names.extend(super::rows::group_ids(packed));
                        names.as_slice()
                    });
                    f(id, &RosterRecord::decode(bytes)?, groups)
                }
                Row::Stored { id } => match t.tree.get(keys::record(id))? {
                    Some(bytes) => f(id, &RosterRecord::decode(&bytes)?, None),
                    // Deleted since the walk began.
                    None => Ok(true),
                },
            });
            if let Some(walked) = walked {
                return walked;
            }
        }
        for bytes in self.scan_records_after(tenant, None)? {
            let bytes = bytes?;
            if !f(bytes.id(), &bytes.record()?, None)? {
                break;
            }
        }
        Ok(())
    }

    /// One user's roster record, read from the export's row file when it has it (outside
    /// sled's page cache: the export looks up every user's manager), else from the tree.
    pub fn roster_record_unpaged(
        &self,
        tenant: &str,
        id: &str,
    ) -> StoreResult<Option<RecordBytes>> {
        let t = self.tenant(tenant)?;
        match t.rows.as_ref().and_then(|rows| rows.get(id)) {
            Some(found) => Ok(found.map(|bytes| RecordBytes {
                id: sled::IVec::from(id.as_bytes()),
                bytes: sled::IVec::from(bytes),
            })),
            None => self.roster_record(tenant, id),
        }
    }

    /// Roster records in user id order, after `after`, streamed.
    pub fn scan_records_after(
        &self,
        tenant: &str,
        after: Option<&str>,
    ) -> StoreResult<impl Iterator<Item = StoreResult<RecordBytes>> + use<>> {
        let t = self.tenant(tenant)?;
        let prefix = keys::record("");
        let plen = prefix.len();
        let range = range_after(&prefix, after.map(keys::record));
        Ok(t.tree.range(range).map(move |kv| {
            let (k, bytes) = kv?;
            Ok(RecordBytes {
                id: k.subslice(plen, k.len() - plen),
                bytes,
            })
        }))
    }
}

/// The stored bytes of the record of a user with this document and assignment: what
/// `rosterd store check` compares the stored record with.
pub(super) fn expected(doc: &Value, assignment: Option<&Assignment>) -> StoreResult<Vec<u8>> {
    encode(&RosterRecord {
        user: UserFields::new(doc),
        assignment: assignment.map(RecordAssignment::new),
    })
}

/// Build every user's record and index entries in `tree` from the stored documents and
/// assignments: the migration from layout version 1, which had neither the records nor
/// the inactive index, and from 2 to 6, whose records held names as `name` had them. Idempotent, so a crash part-way just runs it again. Returns the
/// number of users.
pub(super) fn build_all(tree: &sled::Tree) -> StoreResult<u64> {
    let user_prefix = keys::resource_prefix(ResourceKind::User);
    let mut users = 0u64;
    let mut out = super::UpgradeWriter::new(tree);
    for kv in tree.scan_prefix(&user_prefix) {
        let (k, v) = kv?;
        let id = String::from_utf8_lossy(&k[user_prefix.len()..]).into_owned();
        let doc: Value = super::decode(&v)?;
        let assignment: Option<Assignment> = tree
            .get(keys::assignment(&id))?
            .map(|b| super::decode(&b))
            .transpose()?;
        let record = RosterRecord {
            user: UserFields::new(&doc),
            assignment: assignment.as_ref().map(RecordAssignment::new),
        };
        out.insert(keys::record(&id), encode(&record)?)?;
        for (index, value) in index_entries(ResourceKind::User, &id, &doc) {
            out.insert(
                keys::index_entry(index, &value, &id),
                keys::index_value(index, &id),
            )?;
        }
        users += 1;
    }
    out.finish()?;
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::super::{SCHEMA_VERSION, SCHEMA_VERSION_KEY, Store, Update};
    use super::*;
    use serde_json::json;

    #[test]
    fn the_shown_email_is_primary_then_work_then_first_then_the_user_name() {
        let shown = |emails: Value| {
            let d = json!({"userName": "u@x.test", "emails": emails});
            UserFields::new(&d).email.map(str::to_owned)
        };
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            shown(
                json!([{"value": "h@x.test", "type": "home"}, {"value": "w@x.test", "type": "Work"}])
            ),
            some("w@x.test")
        );
        assert_eq!(
            shown(
                json!([{"value": "", "type": "work", "primary": true}, {"value": "h@x.test", "type": "home"}])
            ),
            some("h@x.test")
        );
        assert_eq!(
            shown(json!([{"value": "h@x.test"}, {"value": "p@x.test", "primary": true}])),
            some("p@x.test")
        );
        assert_eq!(shown(json!([{"value": ""}])), some("u@x.test"));
        assert_eq!(shown(json!(null)), some("u@x.test"));
    }

    fn doc(title: &str) -> Value {
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
               "userName": "ada@x.test", "name": {"givenName": "Ada", "familyName": ""},
               "emails": [{"value": "home@x.test", "type": "home"},
                          {"value": "Ada@X.test", "type": "work"}],
               "title": title, "active": false, "externalId": "e-1",
               ENTERPRISE_USER_SCHEMA: {"department": "R&D", "manager": {"value": "m-1"}}})
    }

    fn owned(store: &Store, id: &str) -> Option<(String, Option<String>, bool, Option<f64>)> {
        let bytes = store.roster_record("t", id).unwrap()?;
        let r = bytes.record().unwrap();
        Some((
            r.user.user_name.to_owned(),
            r.user.title.map(str::to_owned),
            r.user.active,
            r.confidence(),
        ))
    }

    #[tokio::test]
    async fn every_write_keeps_the_record_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let id = store
            .create("t", ResourceKind::User, doc("Engineer"), vec![])
            .await
            .unwrap()
            .id;
        {
            let bytes = store.roster_record("t", &id).unwrap().unwrap();
            let r = bytes.record().unwrap();
            assert_eq!(bytes.id(), id);
            // The work address is shown; the other is still found by the filter.
            assert_eq!(r.user.email, Some("Ada@X.test"));
            assert!(r.user.has_email("HOME@x.test") && r.user.has_email("ada@x.test"));
            assert!(!r.user.has_email("nobody@x.test"));
            let mut other = doc("Engineer");
            other["userName"] = json!("Login@X.test");
            let login = UserFields::new(&other);
            assert!(
                login.has_email("login@x.test"),
                "a userName that is an address"
            );
            assert!(login.has_email("home@x.test"));
            other["userName"] = json!("login");
            assert!(!UserFields::new(&other).has_email("login"));
            assert_eq!(r.user.given_name.as_deref(), Some("Ada"));
            assert_eq!(r.user.family_name, None, "empty strings are absent");
            assert_eq!(
                (r.user.department, r.user.manager, r.user.external_id),
                (Some("R&D"), Some("m-1"), Some("e-1"))
            );
            assert!(r.assignment.is_none());
        }

        store
            .update("t", ResourceKind::User, &id, None, |_| {
                let mut d = doc("Designer");
                d["active"] = json!(true);
                Ok(Update {
                    doc: d,
                    members: vec![],
                })
            })
            .await
            .unwrap();
        let a = store
            .set_override("t", &id, Some("designer".into()), "user:admin")
            .await
            .unwrap();
        {
            let bytes = store.roster_record("t", &id).unwrap().unwrap();
            let r = bytes.record().unwrap();
            assert_eq!((r.user.title, r.user.active), (Some("Designer"), true));
            let ra = r.assignment.as_ref().unwrap();
            assert_eq!(ra.archetype_id, Some("designer"));
            assert_eq!(ra.assigned_by, "user:admin");
            assert_eq!(ra.assigned_at(), a.assigned_at, "to the nanosecond");
        }
        // A document-only write keeps the assignment half as stored.
        store
            .update("t", ResourceKind::User, &id, None, |_| {
                Ok(Update {
                    doc: doc("Illustrator"),
                    members: vec![],
                })
            })
            .await
            .unwrap();
        assert_eq!(
            owned(&store, &id),
            Some((
                "ada@x.test".into(),
                Some("Illustrator".into()),
                false,
                Some(a.confidence)
            ))
        );
        {
            let bytes = store.roster_record("t", &id).unwrap().unwrap();
            assert_eq!(bytes.record().unwrap().archetype_id(), Some("designer"));
        }
        // A write path that hands over nothing still leaves a right record.
        store
            .write_sync("t", |txn| {
                let mut d = doc("Painter");
                d["id"] = json!(id.clone());
                txn.put(
                    keys::resource(ResourceKind::User, &id),
                    super::super::encode(&d)?,
                );
                Ok(())
            })
            .unwrap();
        assert_eq!(owned(&store, &id).unwrap().1.as_deref(), Some("Painter"));
        {
            let bytes = store.roster_record("t", &id).unwrap().unwrap();
            assert_eq!(bytes.record().unwrap().archetype_id(), Some("designer"));
        }
        let listed: Vec<String> = store
            .scan_records_after("t", None)
            .unwrap()
            .map(|b| b.unwrap().id().to_owned())
            .collect();
        assert_eq!(listed, vec![id.clone()]);

        store
            .delete("t", ResourceKind::User, &id, None)
            .await
            .unwrap();
        assert!(owned(&store, &id).is_none());
        assert_eq!(store.scan_records_after("t", None).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_layout_6_directory_gets_its_names_derived_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            let d = json!({"userName": "grace@x.test", "displayName": "Grace Hopper",
                           "name": {"familyName": " "}});
            let id = crate::store::testing::create_user(&store, d).await;
            store.close().unwrap();
            id
        };
        {
            // What layout 6 wrote for that user: `name` as sent, no full name read.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            let stored = tree.get(keys::record(&id)).unwrap().unwrap();
            let mut old = RosterRecord::decode(&stored).unwrap();
            old.user.given_name = None;
            old.user.family_name = Some(Cow::Borrowed(" "));
            tree.insert(keys::record(&id), encode(&old).unwrap())
                .unwrap();
            db.insert(SCHEMA_VERSION_KEY, b"6").unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        {
            let bytes = store.roster_record("t", &id).unwrap().unwrap();
            let r = bytes.record().unwrap();
            assert_eq!(
                (r.user.given_name.as_deref(), r.user.family_name.as_deref()),
                (Some("Grace"), Some("Hopper"))
            );
        }
        let checked = store.check(&[]).unwrap();
        assert_eq!(checked.len(), 1);
        assert_eq!(checked[0].problems, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_layout_1_directory_gets_its_records_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            let mut ids = Vec::new();
            for title in ["A", "B", "C"] {
                let mut d = doc(title);
                d["userName"] = json!(title);
                ids.push(crate::store::testing::create_user(&store, d).await);
            }
            store.close().unwrap();
            ids
        };
        {
            // What layout 1 had: no records and no inactive index.
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            for id in &ids {
                tree.remove(keys::record(id)).unwrap();
                tree.remove(keys::index_entry(super::super::Index::Inactive, "", id))
                    .unwrap();
            }
            db.insert(SCHEMA_VERSION_KEY, b"1").unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let mut titles: Vec<_> = ids
            .iter()
            .map(|id| owned(&store, id).unwrap().1.unwrap())
            .collect();
        titles.sort();
        assert_eq!(titles, ["A", "B", "C"]);
        assert_eq!(store.count_inactive("t").unwrap(), 3);
        store.close().unwrap();
        drop(store);
        let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
        assert_eq!(
            db.get(SCHEMA_VERSION_KEY).unwrap().as_deref(),
            Some(SCHEMA_VERSION.to_string().as_bytes())
        );
    }
}
