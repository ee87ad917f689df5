//! Delivery state of the downstream connectors: one cursor per connector over the
//! tenant's change log, the dead letters it set aside, and the content hash of what it
//! last delivered for each object (which reconciliation compares with the current state).
//!
//! Connector names are the drop-in file's `name`; everything here is keyed by tenant and
//! connector so that removing a connector file and adding it back resumes where it was.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{ChangeEvent, Store, StoreError, StoreResult, Txn, decode, decode_u64, encode};

const SEP: u8 = 0;

/// `tag SEP conn`: the start of every key of one connector's delivery state.
fn tagged(tag: u8, connector: &str) -> Vec<u8> {
    let mut k = vec![tag, SEP];
    k.extend_from_slice(connector.as_bytes());
    k
}

/// `k conn` → cursor (u64 big-endian): every change up to it was acknowledged.
fn cursor_key(connector: &str) -> Vec<u8> {
    tagged(b'k', connector)
}

/// A restore, into `batch`: the connector cursors that stand at `last` move to `next`
/// with the change counter, and every connector's files are owed a write (see
/// [`Store::mark_write_due`]; only a CSV connector has files). Returns how many cursors
/// moved.
pub(super) fn restore_cursors(
    tree: &sled::Tree,
    last: u64,
    next: u64,
    batch: &mut sled::Batch,
) -> StoreResult<usize> {
    let mut moved = 0;
    for kv in tree.scan_prefix([b'k', SEP]) {
        let (k, v) = kv?;
        if super::decode_u64(&v, "connector cursor")? == last {
            batch.insert(k.as_ref(), &next.to_be_bytes());
            moved += 1;
        }
        let mut due = k.to_vec();
        due[0] = b'w';
        batch.insert(due, &1u64.to_be_bytes());
    }
    Ok(moved)
}

/// `K conn` → sequence numbers above the cursor (u64 big-endian each) acknowledged while
/// a change below them was still in flight. A restart or reload skips them instead of
/// sending them again: a slow request held the cursor, and a clean stop re-sent every
/// change acknowledged after it. (`a` is the assignments' family, see `keys.rs`.)
fn acked_above_key(connector: &str) -> Vec<u8> {
    tagged(b'K', connector)
}

/// `R conn` → 1: the connector was retired (its file removed and the daemon reloaded),
/// so its stored cursor no longer holds back change-log compaction.
fn retired_key(connector: &str) -> Vec<u8> {
    tagged(b'R', connector)
}

/// `w conn` → 1: a scheduled write of the connector's files came due and has not
/// succeeded yet, so a start writes them at once rather than at its next scheduled time
/// (a nightly file would miss its night).
fn write_due_key(connector: &str) -> Vec<u8> {
    tagged(b'w', connector)
}

/// `F conn` → 1: a full reconciliation of the connector began and has not yet marked what
/// it is to send (see `Store::set_full_owed`).
fn full_owed_key(connector: &str) -> Vec<u8> {
    tagged(b'F', connector)
}

/// `W conn` → when the connector's last scheduled write succeeded, so that a start can
/// tell a scheduled time missed while the daemon was down.
fn scheduled_write_key(connector: &str) -> Vec<u8> {
    tagged(b'W', connector)
}

/// `A conn` → the last change (u64 big-endian) an operator let through the connector's
/// `[guard]` by resuming it: a start counts the deprovisions after it only.
fn guard_approved_key(connector: &str) -> Vec<u8> {
    tagged(b'A', connector)
}

/// `S conn` → ranges of changes (`after`, `through`], u64 big-endian pairs, that an
/// operator skipped at a hold (`rosterd resume --skip-held`) while a change before them
/// was still in flight. The cursor stays below them until that change is acknowledged,
/// and meanwhile a restart sent every skipped change, and a reconciliation took them for
/// changes still to come. Dropped once the cursor passes them.
fn guard_skipped_key(connector: &str) -> Vec<u8> {
    tagged(b'S', connector)
}

fn decode_ranges(v: &[u8]) -> StoreResult<Vec<(u64, u64)>> {
    v.chunks(16)
        .map(|c| {
            let (after, through) = c.split_at(c.len().min(8));
            Ok((
                decode_u64(after, "skipped changes")?,
                decode_u64(through, "skipped changes")?,
            ))
        })
        .collect()
}

fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    ranges
        .iter()
        .flat_map(|(a, t)| a.to_be_bytes().into_iter().chain(t.to_be_bytes()))
        .collect()
}

/// Into `txn`: the skipped ranges of `connector` that reach above `cursor`, and `add`.
fn keep_skipped(
    txn: &mut Txn<'_>,
    connector: &str,
    cursor: u64,
    add: Option<(u64, u64)>,
) -> StoreResult<()> {
    let key = guard_skipped_key(connector);
    let Some(v) = txn.get(&key)? else {
        if let Some(range) = add {
            txn.put(key, encode_ranges(&[range]));
        }
        return Ok(());
    };
    let mut ranges = decode_ranges(&v)?;
    let before = ranges.len();
    ranges.retain(|&(_, through)| through > cursor);
    ranges.extend(add);
    if ranges.is_empty() {
        txn.del(key);
    } else if ranges.len() != before || add.is_some() {
        txn.put(key, encode_ranges(&ranges));
    }
    Ok(())
}

/// `P conn` → [`RefusalPause`]: why the connector is paused until resumed: its target refused
/// `pause_after_refusals` requests in a row. Kept, so that a restart does not set aside
/// that many changes again before pausing again.
fn refusal_pause_key(connector: &str) -> Vec<u8> {
    tagged(b'P', connector)
}

/// `d conn SEP id` → dead letter.
fn dead_prefix(connector: &str) -> Vec<u8> {
    let mut k = tagged(b'd', connector);
    k.push(SEP);
    k
}

fn dead_key(connector: &str, id: u64) -> Vec<u8> {
    let mut k = dead_prefix(connector);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(super) const DEAD_SEQ_KEY: &[u8] = b"s\0dseq";

/// `s count:dead:conn` → how many dead letters the connector has (big-endian u64).
/// `/status` and every `/metrics` scrape show the count: walked, 270,000 letters cost
/// 0.8 s of CPU a call and pulled every letter through sled's cache (a soak's 700 MB).
fn dead_count_key(connector: impl AsRef<[u8]>) -> Vec<u8> {
    let mut k = b"s\0count:dead:".to_vec();
    k.extend_from_slice(connector.as_ref());
    k
}

/// The connector's count of dead letters moved by `by` within `txn`.
fn add_to_dead_count(txn: &mut Txn<'_>, connector: &str, by: i64) -> StoreResult<()> {
    let key = dead_count_key(connector);
    let now = match txn.get(&key)? {
        Some(v) => decode_u64(&v, "dead-letter count")?,
        None => 0,
    };
    txn.put(key, now.saturating_add_signed(by).to_be_bytes().to_vec());
    Ok(())
}

/// Layout 6: each connector's count of dead letters, from its letters. Returns how many
/// letters were counted.
pub(super) fn build_dead_counts(tree: &sled::Tree) -> StoreResult<u64> {
    let mut counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut total = 0;
    // `d SEP conn SEP id`: the id is the last eight bytes.
    for k in tree.scan_prefix([b'd', SEP]).keys() {
        let k = k?;
        if k.len() >= 2 + 1 + 8 {
            *counts.entry(k[2..k.len() - 9].to_vec()).or_default() += 1;
            total += 1;
        }
    }
    let mut writer = super::UpgradeWriter::new(tree);
    for (connector, n) in counts {
        writer.insert(dead_count_key(connector), n.to_be_bytes().to_vec())?;
    }
    writer.finish()?;
    Ok(total)
}

/// For `rosterd store check`: no connector's cursor is past the change log's sequence
/// counter `last_seq` (it would skip the changes up to it), every dead letter decodes
/// under an id its counter has given out, and each connector's count of letters is its
/// letters. Returns how many letters there are. A repair puts the counts right, and the
/// letters' counter past every letter.
pub(super) fn check(
    tree: &sled::Tree,
    last_seq: u64,
    c: &mut super::check::TenantCheck,
) -> StoreResult<u64> {
    let mut furthest = last_seq;
    for kv in tree.scan_prefix([b'k', SEP]) {
        let (k, v) = kv?;
        let connector = String::from_utf8_lossy(&k[2..]).into_owned();
        let cursor = decode_u64(&v, "connector cursor")?;
        if cursor > last_seq {
            c.problem(format!(
                "connector {connector:?} has acknowledged up to change {cursor}, past the last change ({last_seq}): it would skip the next {} changes",
                cursor - last_seq
            ));
            furthest = furthest.max(cursor);
        }
    }
    // The next change is numbered past every cursor, so that none skips it; the numbers
    // between were never used.
    if furthest > last_seq {
        c.fix(
            tree,
            super::keys::SEQ_KEY.to_vec(),
            Some(furthest.to_be_bytes().to_vec()),
        )?;
    }
    let given_out = match tree.get(DEAD_SEQ_KEY)? {
        Some(v) => decode_u64(&v, "dead-letter counter")?,
        None => 0,
    };
    let mut letters: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut total = 0;
    let mut highest = given_out;
    for kv in tree.scan_prefix([b'd', SEP]) {
        let (k, v) = kv?;
        // `d SEP conn SEP id`: the id is the last eight bytes.
        let Some(split) = k.len().checked_sub(9).filter(|&s| s >= 2) else {
            c.problem(format!(
                "a dead letter under a malformed key: {:?}",
                String::from_utf8_lossy(&k)
            ));
            continue;
        };
        let connector = &k[2..split];
        let id = super::be_u64(&k[split + 1..]).unwrap_or(0);
        *letters.entry(connector.to_vec()).or_default() += 1;
        total += 1;
        let name = String::from_utf8_lossy(connector);
        if id > given_out {
            highest = highest.max(id);
            c.problem(format!(
                "dead letter {id} of connector {name:?} is past the letters' counter ({given_out}): the next letter set aside would overwrite it"
            ));
        }
        match decode::<DeadLetter>(&v) {
            Ok(letter) if letter.id != id => c.problem(format!(
                "dead letter {id} of connector {name:?} holds letter {}",
                letter.id
            )),
            Ok(_) => {}
            Err(e) => c.problem(format!(
                "dead letter {id} of connector {name:?} does not decode ({e}): it can only be discarded"
            )),
        }
    }
    if highest > given_out {
        c.fix(
            tree,
            DEAD_SEQ_KEY.to_vec(),
            Some(highest.to_be_bytes().to_vec()),
        )?;
    }
    let counted_prefix = dead_count_key("");
    let mut counted: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for kv in tree.scan_prefix(&counted_prefix) {
        let (k, v) = kv?;
        counted.insert(
            k[counted_prefix.len()..].to_vec(),
            decode_u64(&v, "dead-letter count")?,
        );
    }
    for (connector, says, has) in super::check::disagreeing(&counted, &letters) {
        c.problem(format!(
            "connector {:?} is counted as holding {says} dead letters, but holds {has}: status and metrics show the wrong number",
            String::from_utf8_lossy(connector)
        ));
        c.fix(
            tree,
            dead_count_key(connector),
            Some(has.to_be_bytes().to_vec()),
        )?;
    }
    Ok(total)
}

/// `D conn SEP seq what` → the id of the dead letter holding that change's request.
/// After a crash the batch is delivered again, and a target that refused a request
/// refuses it again: the letter it already has is kept instead of a second one.
/// `what` tells a change's requests apart (a OneRoster user, its enrollments and its
/// reports are each their own URL): method and URL, or the reason for a change that never
/// became a request. Not the body: a re-sent report carries the time it was built. A
/// webhook's events of one change share a URL, but go out one after another and the
/// change stops at the first refused, so the letter stands for the change.
fn dead_ref_key(letter: &DeadLetter) -> Vec<u8> {
    let mut k = tagged(b'D', &letter.connector);
    k.push(SEP);
    k.extend_from_slice(&letter.event.seq.to_be_bytes());
    let what = match &letter.request {
        Some(r) => format!("{} {}", r.method, r.url),
        None => format!("- {}", letter.reason),
    };
    k.extend_from_slice(what.as_bytes());
    k
}

/// `h conn SEP object` → content hash of the last delivered state.
fn hash_prefix(connector: &str) -> Vec<u8> {
    let mut k = tagged(b'h', connector);
    k.push(SEP);
    k
}

fn hash_key(connector: &str, object: &str) -> Vec<u8> {
    let mut k = hash_prefix(connector);
    k.extend_from_slice(object.as_bytes());
    k
}

/// A request as it was sent, kept so an operator can see what the target refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentRequest {
    pub method: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// The target's answer, when there was one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
}

/// A connector paused until resumed because its target refused everything: why, and
/// since when (a restart shows the time it began, not the start's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalPause {
    pub at: DateTime<Utc>,
    pub why: String,
    /// The start of the target's last refusal, which `why` quotes (kept apart so that
    /// `/status` can leave it out after a restart too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// A change a connector could not deliver and set aside instead of retrying forever.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub connector: String,
    pub at: DateTime<Utc>,
    pub reason: String,
    pub request: Option<SentRequest>,
    pub response: Option<TargetResponse>,
    /// The change being delivered; replay sends it again.
    pub event: ChangeEvent,
}

impl DeadLetter {
    /// What a list shows of a stored letter that does not decode: its id, and why it
    /// can only be discarded.
    fn unreadable(id: u64, connector: &str, e: &StoreError) -> DeadLetter {
        DeadLetter {
            id,
            connector: connector.to_owned(),
            at: DateTime::<Utc>::UNIX_EPOCH,
            reason: format!("this dead letter cannot be read ({e}); it can only be discarded"),
            request: None,
            response: None,
            event: ChangeEvent::bare(
                0,
                DateTime::<Utc>::UNIX_EPOCH,
                "",
                "",
                super::ChangeOp::Updated,
            ),
        }
    }
}

fn put_hashes(txn: &mut super::Txn<'_>, connector: &str, hashes: Vec<(String, Option<u64>)>) {
    for (object, hash) in hashes {
        let k = hash_key(connector, &object);
        match hash {
            Some(h) => txn.put(k, h.to_be_bytes().to_vec()),
            None => txn.del(k),
        }
    }
}

impl Store {
    /// Every change up to this sequence number was acknowledged by the connector.
    pub fn cursor(&self, tenant: &str, connector: &str) -> StoreResult<u64> {
        self.u64_at(tenant, cursor_key(connector), "connector cursor")
    }

    /// The last change an operator let through the connector's guard; 0 for none.
    pub fn guard_approved(&self, tenant: &str, connector: &str) -> StoreResult<u64> {
        self.u64_at(tenant, guard_approved_key(connector), "guard approval")
    }

    /// The number kept under `key` (a change's sequence number, a count); 0 (before the
    /// first change, none counted) when none is.
    fn u64_at(&self, tenant: &str, key: Vec<u8>, what: &str) -> StoreResult<u64> {
        super::u64_in(&self.tenant(tenant)?.tree, &key, what)
    }

    /// Record that an operator let every change up to `through` through the guard; with
    /// `skipped_after`, that the changes after it up to `through` are skipped, not sent
    /// (see [`Store::guard_skipped`]).
    pub async fn set_guard_approved(
        &self,
        tenant: &str,
        connector: &str,
        through: u64,
        skipped_after: Option<u64>,
    ) -> StoreResult<()> {
        let key = guard_approved_key(connector);
        let connector = connector.to_owned();
        self.write(tenant, move |txn| {
            txn.put(key, through.to_be_bytes().to_vec());
            if let Some(after) = skipped_after.filter(|&a| a < through) {
                let cursor = match txn.get(&cursor_key(&connector))? {
                    Some(v) => decode_u64(&v, "connector cursor")?,
                    None => 0,
                };
                keep_skipped(txn, &connector, cursor, Some((after, through)))?;
            }
            Ok(())
        })
        .await
    }

    /// The ranges of changes (`after`, `through`] above the connector's cursor that an
    /// operator skipped at a hold: done, as if acknowledged, though never sent.
    pub fn guard_skipped(&self, tenant: &str, connector: &str) -> StoreResult<Vec<(u64, u64)>> {
        let t = self.tenant(tenant)?;
        match t.tree.get(guard_skipped_key(connector))? {
            Some(v) => decode_ranges(&v),
            None => Ok(Vec::new()),
        }
    }

    /// Why the connector was paused for its target's refusals, while it waits for an
    /// operator's resume.
    pub fn refusal_pause(
        &self,
        tenant: &str,
        connector: &str,
    ) -> StoreResult<Option<RefusalPause>> {
        self.tenant(tenant)?
            .tree
            .get(refusal_pause_key(connector))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Record the connector's pause for refusals (`Some(why)`), or its end.
    pub async fn set_refusal_pause(
        &self,
        tenant: &str,
        connector: &str,
        pause: Option<&RefusalPause>,
    ) -> StoreResult<()> {
        let key = refusal_pause_key(connector);
        let value = pause.map(encode).transpose()?;
        self.write(tenant, move |txn| {
            match value {
                Some(v) => txn.put(key, v),
                None => txn.del(key),
            }
            Ok(())
        })
        .await
    }

    /// Whether the connector has a cursor at all (it ran, or was running, at some time).
    pub fn has_cursor(&self, tenant: &str, connector: &str) -> StoreResult<bool> {
        self.has_key(tenant, cursor_key(connector))
    }

    /// Every stored cursor of the tenant, by cursor name (running connectors, and
    /// connectors whose file is broken or gone).
    pub fn cursors(&self, tenant: &str) -> StoreResult<Vec<(String, u64)>> {
        self.u64s_under(tenant, &cursor_key(""), "connector cursor")
    }

    /// The connectors retired on purpose (by name, not cursor name): their cursors stay,
    /// so a file with the same name later resumes, but hold nothing back.
    pub fn retired(&self, tenant: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .u64s_under(tenant, &retired_key(""), "retired connector")?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Mark a connector retired, or (when a file brings it back) not any more.
    pub async fn set_retired(
        &self,
        tenant: &str,
        connector: &str,
        retired: bool,
    ) -> StoreResult<()> {
        self.set_flag(tenant, retired_key(connector), retired).await
    }

    /// Whether the connector's scheduled write is owed (see [`Store::mark_write_due`]).
    pub fn write_due(&self, tenant: &str, connector: &str) -> StoreResult<bool> {
        self.has_key(tenant, write_due_key(connector))
    }

    /// Whether a full reconciliation of the connector was cut off before it marked what it
    /// was to send: the next reconciliation runs full in its place.
    pub fn full_owed(&self, tenant: &str, connector: &str) -> StoreResult<bool> {
        self.has_key(tenant, full_owed_key(connector))
    }

    /// Record that a full reconciliation of the connector is under way and has not marked
    /// what it is to send yet (`on`), or that it has.
    pub async fn set_full_owed(&self, tenant: &str, connector: &str, on: bool) -> StoreResult<()> {
        self.set_flag(tenant, full_owed_key(connector), on).await
    }

    fn has_key(&self, tenant: &str, key: Vec<u8>) -> StoreResult<bool> {
        Ok(self.tenant(tenant)?.tree.contains_key(key)?)
    }

    /// Record that a scheduled write of the connector's files is owed (its time came and
    /// it has not succeeded yet: it runs, failed, or a stop or a crash cut it short), until
    /// [`Store::scheduled_write_done`].
    pub async fn mark_write_due(&self, tenant: &str, connector: &str) -> StoreResult<()> {
        self.set_flag(tenant, write_due_key(connector), true).await
    }

    /// The connector has no files (it sends over HTTP): a write a restore marked owed for
    /// every cursor (see [`restore_cursors`]) is not its to make, and would linger.
    pub async fn no_write_owed(&self, tenant: &str, connector: &str) -> StoreResult<()> {
        if self.write_due(tenant, connector)? {
            self.set_flag(tenant, write_due_key(connector), false)
                .await?;
        }
        Ok(())
    }

    /// A scheduled write succeeded at `at`: it is no longer owed, and `at` is the last
    /// one (see [`Store::last_scheduled_write`]), in one write.
    pub async fn scheduled_write_done(
        &self,
        tenant: &str,
        connector: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let (due, last, at) = (
            write_due_key(connector),
            scheduled_write_key(connector),
            encode(&at)?,
        );
        self.write(tenant, move |txn| {
            txn.del(due);
            txn.put(last, at);
            Ok(())
        })
        .await
    }

    /// When the connector's last scheduled write succeeded; None before the first (or in
    /// a store written by a build that did not record it).
    pub fn last_scheduled_write(
        &self,
        tenant: &str,
        connector: &str,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        self.get_decoded(tenant, scheduled_write_key(connector))
    }

    async fn set_flag(&self, tenant: &str, key: Vec<u8>, on: bool) -> StoreResult<()> {
        self.write(tenant, move |txn| {
            if on {
                txn.put(key, 1u64.to_be_bytes().to_vec());
            } else {
                txn.del(key);
            }
            Ok(())
        })
        .await
    }

    /// Move the cursor, durably, together with the delivered-content hashes of the batch
    /// it covers (`None` removes a hash: the object is gone downstream).
    pub async fn advance_cursor(
        &self,
        tenant: &str,
        connector: &str,
        seq: u64,
        hashes: Vec<(String, Option<u64>)>,
    ) -> StoreResult<()> {
        self.record_progress(tenant, connector, seq, Vec::new(), hashes)
            .await
    }

    /// [`Store::advance_cursor`], with the changes above the cursor that were
    /// acknowledged too (their hashes among `hashes`); [`Store::acked_above`] reads them.
    pub async fn record_progress(
        &self,
        tenant: &str,
        connector: &str,
        seq: u64,
        acked_above: Vec<u64>,
        hashes: Vec<(String, Option<u64>)>,
    ) -> StoreResult<()> {
        let connector = connector.to_owned();
        self.write(tenant, move |txn| {
            txn.put(cursor_key(&connector), seq.to_be_bytes().to_vec());
            let key = acked_above_key(&connector);
            if acked_above.is_empty() {
                txn.del(key);
            } else {
                txn.put(
                    key,
                    acked_above.iter().flat_map(|s| s.to_be_bytes()).collect(),
                );
            }
            put_hashes(txn, &connector, hashes);
            keep_skipped(txn, &connector, seq, None)
        })
        .await
    }

    /// The changes above the connector's cursor it acknowledged (see
    /// [`Store::record_progress`]).
    pub fn acked_above(&self, tenant: &str, connector: &str) -> StoreResult<Vec<u64>> {
        let t = self.tenant(tenant)?;
        let Some(v) = t.tree.get(acked_above_key(connector))? else {
            return Ok(Vec::new());
        };
        v.chunks(8)
            .map(|c| decode_u64(c, "acknowledged change above the cursor"))
            .collect()
    }

    /// Record delivered-content hashes without moving the cursor (reconciliation).
    pub async fn set_delivered(
        &self,
        tenant: &str,
        connector: &str,
        hashes: Vec<(String, Option<u64>)>,
    ) -> StoreResult<()> {
        let connector = connector.to_owned();
        self.write(tenant, move |txn| {
            put_hashes(txn, &connector, hashes);
            Ok(())
        })
        .await
    }

    /// The hash of what the connector last delivered for `object`.
    pub fn delivered(
        &self,
        tenant: &str,
        connector: &str,
        object: &str,
    ) -> StoreResult<Option<u64>> {
        let t = self.tenant(tenant)?;
        t.tree
            .get(hash_key(connector, object))?
            .map(|v| decode_u64(&v, "delivered-content hash"))
            .transpose()
    }

    /// Every object the connector has delivered, with its hash, in object order.
    pub fn delivered_all(&self, tenant: &str, connector: &str) -> StoreResult<Vec<(String, u64)>> {
        self.u64s_under(tenant, &hash_prefix(connector), "delivered-content hash")
    }

    /// Every key under `prefix`, without the prefix, with its u64 value (`what` names it
    /// in a decoding error).
    fn u64s_under(
        &self,
        tenant: &str,
        prefix: &[u8],
        what: &str,
    ) -> StoreResult<Vec<(String, u64)>> {
        let t = self.tenant(tenant)?;
        let mut out = Vec::new();
        for kv in t.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((name, decode_u64(&v, what)?));
        }
        Ok(out)
    }

    /// Set a change aside; returns the dead letter's id. The same request of the same
    /// change set aside again (its batch was delivered again after a crash) keeps the
    /// letter it has, with its id.
    pub async fn add_dead_letter(&self, tenant: &str, mut letter: DeadLetter) -> StoreResult<u64> {
        self.write(tenant, move |txn| {
            let reference = dead_ref_key(&letter);
            if let Some(v) = txn.get(&reference)? {
                let id = decode_u64(&v, "dead-letter reference")?;
                if txn.exists(&dead_key(&letter.connector, id))? {
                    return Ok(id);
                }
            }
            let id = txn.next_counter(DEAD_SEQ_KEY, "dead-letter counter")?;
            add_to_dead_count(txn, &letter.connector, 1)?;
            letter.id = id;
            txn.put(reference, id.to_be_bytes().to_vec());
            txn.put(
                dead_key(&letter.connector, id),
                serde_json::to_vec(&letter).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
            Ok(id)
        })
        .await
    }

    /// A connector's dead letters with ids above `after`, oldest first, at most `limit`:
    /// a target that refused everything for a day can leave a hundred thousand, which
    /// no caller should have to take in one answer.
    pub fn dead_letters(
        &self,
        tenant: &str,
        connector: &str,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<DeadLetter>> {
        let t = self.tenant(tenant)?;
        let prefix = dead_prefix(connector);
        let start = match after {
            None => prefix.clone(),
            Some(id) => match id.checked_add(1) {
                Some(next) => dead_key(connector, next),
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        for kv in t.tree.range(start..).take(limit) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            // One that cannot be read is listed as such, so that it can be discarded:
            // failing the list made every letter of the connector unlistable.
            let id = super::be_u64(&k[prefix.len()..]).unwrap_or(0);
            out.push(
                super::decode(&v).unwrap_or_else(|e| DeadLetter::unreadable(id, connector, &e)),
            );
        }
        Ok(out)
    }

    pub fn dead_letter_count(&self, tenant: &str, connector: &str) -> StoreResult<u64> {
        self.u64_at(tenant, dead_count_key(connector), "dead-letter count")
    }

    pub fn dead_letter(
        &self,
        tenant: &str,
        connector: &str,
        id: u64,
    ) -> StoreResult<Option<DeadLetter>> {
        let t = self.tenant(tenant)?;
        t.tree
            .get(dead_key(connector, id))?
            .map(|v| super::decode(&v))
            .transpose()
    }

    /// Remove a dead letter (discarded, or replayed successfully). False if it was not there.
    pub async fn remove_dead_letter(
        &self,
        tenant: &str,
        connector: &str,
        id: u64,
    ) -> StoreResult<bool> {
        let removed = self
            .remove_dead_letters(tenant, connector, vec![id])
            .await?;
        Ok(removed.first() == Some(&true))
    }

    /// Remove several dead letters in one write (an operator's discard of many: one
    /// write, and one flush, for them all); for each id, whether it was there.
    pub async fn remove_dead_letters(
        &self,
        tenant: &str,
        connector: &str,
        ids: Vec<u64>,
    ) -> StoreResult<Vec<bool>> {
        let connector = connector.to_owned();
        self.write(tenant, move |txn| {
            let mut removed = Vec::with_capacity(ids.len());
            for &id in &ids {
                let key = dead_key(&connector, id);
                let Some(v) = txn.get(&key)? else {
                    removed.push(false);
                    continue;
                };
                // A letter that no longer decodes still goes; only its reference stays.
                if let Ok(letter) = super::decode::<DeadLetter>(&v) {
                    txn.del(dead_ref_key(&letter));
                }
                txn.del(key);
                removed.push(true);
            }
            let gone = removed.iter().filter(|&&r| r).count();
            if gone > 0 {
                add_to_dead_count(txn, &connector, -i64::try_from(gone).unwrap_or(i64::MAX))?;
            }
            Ok(removed)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChangeOp;

    fn event(seq: u64) -> ChangeEvent {
        ChangeEvent::bare(seq, Utc::now(), "User", "u1", ChangeOp::Created)
    }

    #[tokio::test]
    async fn cursors_hashes_and_dead_letters_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            assert_eq!(store.cursor("t", "or").unwrap(), 0);
            store
                .record_progress(
                    "t",
                    "or",
                    7,
                    vec![9, 12],
                    vec![("User/u1".into(), Some(42))],
                )
                .await
                .unwrap();
            let letter = DeadLetter {
                id: 0,
                connector: "or".into(),
                at: Utc::now(),
                reason: "400 from target".into(),
                request: None,
                response: Some(TargetResponse {
                    status: 400,
                    body: "bad".into(),
                }),
                event: event(3),
            };
            assert_eq!(store.add_dead_letter("t", letter.clone()).await.unwrap(), 1);
            // The same change refused again (its batch was delivered again after a
            // crash) keeps its letter.
            assert_eq!(store.add_dead_letter("t", letter.clone()).await.unwrap(), 1);
            // Another request of the same change is a letter of its own.
            let enrollment = DeadLetter {
                request: Some(SentRequest {
                    method: "PUT".into(),
                    url: "http://sis/enrollments/e1".into(),
                    body: Some("{}".into()),
                }),
                ..letter.clone()
            };
            assert_eq!(
                store
                    .add_dead_letter("t", enrollment.clone())
                    .await
                    .unwrap(),
                2
            );
            assert_eq!(store.add_dead_letter("t", enrollment).await.unwrap(), 2);
            // The same request built again (a report carries the time it was built).
            let rebuilt = DeadLetter {
                request: Some(SentRequest {
                    method: "PUT".into(),
                    url: "http://sis/enrollments/e1".into(),
                    body: Some("{\"dateLastModified\":\"later\"}".into()),
                }),
                ..letter.clone()
            };
            assert_eq!(store.add_dead_letter("t", rebuilt).await.unwrap(), 2);
            let other = DeadLetter {
                request: Some(SentRequest {
                    method: "PUT".into(),
                    url: "http://sis/enrollments/e2".into(),
                    body: None,
                }),
                ..letter.clone()
            };
            assert_eq!(store.add_dead_letter("t", other).await.unwrap(), 3);
            assert!(store.remove_dead_letter("t", "or", 3).await.unwrap());
            store.close().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(store.cursor("t", "or").unwrap(), 7);
        assert_eq!(store.acked_above("t", "or").unwrap(), [9, 12]);
        assert!(store.acked_above("t", "other").unwrap().is_empty());
        assert_eq!(store.cursor("t", "other").unwrap(), 0);
        // Only `or`'s cursors are cursors: the record above it is no connector's, nor
        // anyone's assignment.
        assert_eq!(store.cursors("t").unwrap(), [("or".to_owned(), 7)]);
        let assignments: Vec<_> = store.scan_assignments_after("t", None).unwrap().collect();
        assert!(assignments.is_empty(), "{assignments:?}");
        assert_eq!(store.delivered("t", "or", "User/u1").unwrap(), Some(42));
        assert_eq!(store.dead_letter_count("t", "or").unwrap(), 2);
        assert!(store.remove_dead_letter("t", "or", 1).await.unwrap());
        assert!(!store.remove_dead_letter("t", "or", 1).await.unwrap());
        let left = store.dead_letters("t", "or", None, usize::MAX).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, 2);
        assert_eq!(left[0].event.seq, 3);
        // A letter removed (replayed or discarded) and refused again is set aside again.
        let again = DeadLetter {
            id: 0,
            connector: "or".into(),
            at: Utc::now(),
            reason: "400 from target".into(),
            request: None,
            response: None,
            event: event(3),
        };
        assert_eq!(store.add_dead_letter("t", again).await.unwrap(), 4);
        assert_eq!(store.dead_letter_count("t", "or").unwrap(), 2);
        assert_eq!(store.dead_letter_count("t", "other").unwrap(), 0);
        store
            .advance_cursor("t", "or", 12, vec![("User/u1".into(), None)])
            .await
            .unwrap();
        assert_eq!(store.delivered("t", "or", "User/u1").unwrap(), None);
        assert!(store.acked_above("t", "or").unwrap().is_empty());
    }

    /// Ranges skipped at a hold are kept until the cursor passes them, across a reopen,
    /// and each connector's apart.
    #[tokio::test]
    async fn skipped_ranges_last_until_the_cursor_passes_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            store.advance_cursor("t", "or", 4, vec![]).await.unwrap();
            store
                .set_guard_approved("t", "or", 9, Some(6))
                .await
                .unwrap();
            // A resume that lets the changes go records no range; nor does a skip of
            // nothing.
            store
                .set_guard_approved("t", "or-2", 9, None)
                .await
                .unwrap();
            store
                .set_guard_approved("t", "or-2", 9, Some(9))
                .await
                .unwrap();
            store
                .record_progress("t", "or", 5, vec![], vec![])
                .await
                .unwrap();
            store
                .set_guard_approved("t", "or", 20, Some(15))
                .await
                .unwrap();
            store.close().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        assert_eq!(store.guard_skipped("t", "or").unwrap(), [(6, 9), (15, 20)]);
        assert!(store.guard_skipped("t", "or-2").unwrap().is_empty());
        assert_eq!(store.guard_approved("t", "or").unwrap(), 20);
        store
            .record_progress("t", "or", 9, vec![], vec![])
            .await
            .unwrap();
        assert_eq!(store.guard_skipped("t", "or").unwrap(), [(15, 20)]);
        store.advance_cursor("t", "or", 25, vec![]).await.unwrap();
        assert!(store.guard_skipped("t", "or").unwrap().is_empty());
        let families: Vec<u8> = store
            .tenant("t")
            .unwrap()
            .tree
            .iter()
            .keys()
            .map(|k| k.unwrap()[0])
            .collect();
        assert!(!families.contains(&b'S'), "{families:?}");
    }

    /// Layout 5 counted a connector's dead letters by walking them; opened by this
    /// build, a store gets each connector's count from its letters.
    #[tokio::test]
    async fn a_layout_5_directory_gets_its_dead_letter_counts_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
            for (connector, seq) in [("or", 1), ("or", 2), ("or", 3), ("or-2", 4)] {
                let letter = DeadLetter {
                    id: 0,
                    connector: connector.into(),
                    at: Utc::now(),
                    reason: "refused".into(),
                    request: None,
                    response: None,
                    event: event(seq),
                };
                store.add_dead_letter("t", letter).await.unwrap();
            }
            store.close().unwrap();
        }
        {
            let db = crate::store::testing::when_unlocked(|| sled::open(dir.path()));
            let tree = db.open_tree("tenant/t").unwrap();
            for k in tree.scan_prefix(b"s\0count:dead:").keys() {
                tree.remove(k.unwrap()).unwrap();
            }
            db.insert(crate::store::SCHEMA_VERSION_KEY, b"5").unwrap();
            db.flush().unwrap();
        }
        let store = crate::store::testing::when_unlocked(|| Store::open(dir.path()));
        let counts: Vec<u64> = ["or", "or-2", "other"]
            .iter()
            .map(|c| store.dead_letter_count("t", c).unwrap())
            .collect();
        assert_eq!(counts, [3, 1, 0]);
    }
}
