//! A copy of each tenant's roster records in a plain file of fixed-size slots, which the
//! CSV export reads instead of sled.
//!
//! sled has no read that bypasses its page cache: a walk over a million records pulls
//! them all in, and the daemon's RSS grows by 200–370 MiB on the first export after a
//! start (see BENCHMARKS.md). This file is read with `pread` into one reused buffer, so
//! the kernel's page cache holds it, not the process.
//!
//! The file is derived data, like the records themselves, but outside sled's atomic
//! writes: it is written after each transaction is applied (under the tenant's write
//! lock, so in the same order) and vouched for only by a clean close. Its header says
//! whether it was closed cleanly, with a token that the same close stores in the tenant's
//! tree and the tenant's sequence numbers then; an open that finds anything else (a
//! crash, a store restored from a backup, one written by a rosterd that knows nothing of
//! this file, a layout upgrade) builds it again from the records.
//!
//! Layout: a header slot, then one slot per user: a state byte, a flags byte, the
//! record's length (two bytes, little-endian), the id (16 bytes), the record, then the
//! number and ids (16 bytes each) of the groups the user is a direct member of. A record
//! that does not fit is marked as kept in the store only, and the export reads it there;
//! groups that do not fit after the record are flagged, and read from the store.
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use super::{StoreError, StoreResult, keys};

const SLOT: usize = 384;
/// A slot's state, a spare byte, the record's length and the id.
const SLOT_HEAD: usize = 20;
/// The largest record a slot holds. A user as Entra ID or Okta sends one (manager,
/// externalId, two addresses, title, department, assignment) takes about 250 bytes.
const ROOM: usize = SLOT - SLOT_HEAD;
const MAGIC: &[u8; 16] = b"rosterd rows\n\0\0\0";
const VERSION: u32 = 3;
/// Slots read per `pread`: 1.5 MiB, the export's whole buffer.
const CHUNK_SLOTS: usize = 4096;
/// A membership change reads and writes back the slots between two members' up to this
/// far apart (3 KiB) rather than make two calls for each.
const RUN_GAP: u32 = 8;

const FREE: u8 = 0;
const INLINE: u8 = 1;
/// The record did not fit in a slot: read it from the store.
const STORED: u8 = 2;
/// Flag (second byte): the user's groups did not fit after the record; ask the store.
const GROUPS_ELSEWHERE: u8 = 1;

/// One row as the export reads it.
pub(super) enum Row<'a> {
    Record {
        id: &'a str,
        bytes: &'a [u8],
        /// The user's group ids, 16 bytes each; `None`: ask the store.
        groups: Option<&'a [u8]>,
    },
    /// Too large for a slot; the caller reads the record from the store.
    Stored { id: &'a str },
}

/// A user id as the file and the index keep it: 16 bytes. Only an id in the form the
/// store writes (a hyphenated lower-case UUID) is taken, so that [`id_text`] gives the
/// same text back.
pub(crate) fn id_key(id: &str) -> Option<u128> {
    let u = uuid::Uuid::try_parse(id).ok()?;
    let mut text = uuid::Uuid::encode_buffer();
    (u.hyphenated().encode_lower(&mut text) == id).then(|| u.as_u128())
}

fn id_text(key: u128, text: &mut [u8]) -> &str {
    uuid::Uuid::from_u128(key).hyphenated().encode_lower(text)
}

/// An id [`id_key`] does not take: the file cannot hold that user, so it is not used.
fn foreign_id(id: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "user id {id:?} is not in the form the store writes; exports read the store"
    ))
}

/// The slot of each user, in 20 bytes per user: ids sorted, beside their slots, and a
/// small map of the ids added since the last merge. (A hash map of a million ids takes
/// 50 MB, as its table doubles and keeps a quarter or more empty.)
#[derive(Default)]
struct SlotIndex {
    ids: Vec<u128>,
    /// `slots[i]` is the slot of `ids[i]`, or [`GONE`] if the user was removed since the
    /// last merge.
    slots: Vec<u32>,
    recent: HashMap<u128, u32>,
    gone: usize,
}

const GONE: u32 = u32::MAX;

impl SlotIndex {
    /// An index of these (id, slot) pairs, in any order, each id once.
    fn from_pairs(mut pairs: Vec<(u128, u32)>) -> SlotIndex {
        pairs.sort_unstable_by_key(|p| p.0);
        let (ids, slots) = pairs.into_iter().unzip();
        SlotIndex {
            ids,
            slots,
            ..SlotIndex::default()
        }
    }

    fn get(&self, id: u128) -> Option<u32> {
        if let Some(&slot) = self.recent.get(&id) {
            return Some(slot);
        }
        let i = self.ids.binary_search(&id).ok()?;
        Some(self.slots[i]).filter(|&s| s != GONE)
    }

    fn insert(&mut self, id: u128, slot: u32) {
        if let Ok(i) = self.ids.binary_search(&id) {
            if self.slots[i] == GONE {
                self.gone -= 1;
            }
            self.slots[i] = slot;
            return;
        }
        self.recent.insert(id, slot);
        self.merge_if_due();
    }

    fn remove(&mut self, id: u128) -> Option<u32> {
        if let Some(slot) = self.recent.remove(&id) {
            return Some(slot);
        }
        let i = self.ids.binary_search(&id).ok()?;
        let slot = std::mem::replace(&mut self.slots[i], GONE);
        if slot == GONE {
            return None;
        }
        self.gone += 1;
        self.merge_if_due();
        Some(slot)
    }

    fn len(&self) -> usize {
        self.ids.len() - self.gone + self.recent.len()
    }

    /// Merging costs a pass over the sorted ids; doing it when the map or the removed
    /// entries reach an eighth of them keeps that to a few steps per write.
    fn merge_if_due(&mut self) {
        let due = (self.ids.len() / 8).max(4096);
        if self.recent.len() > due || self.gone > due {
            self.merge();
        }
    }

    /// In place, so it needs no second copy of the index: drop the removed entries, then
    /// merge the sorted map in from the back.
    fn merge(&mut self) {
        let mut kept = 0;
        for i in 0..self.ids.len() {
            if self.slots[i] != GONE {
                self.ids[kept] = self.ids[i];
                self.slots[kept] = self.slots[i];
                kept += 1;
            }
        }
        self.gone = 0;
        let mut recent: Vec<(u128, u32)> = self.recent.drain().collect();
        self.recent.shrink_to_fit();
        recent.sort_unstable_by_key(|p| p.0);
        let total = kept + recent.len();
        self.ids.truncate(kept);
        self.slots.truncate(kept);
        self.ids.resize(total, 0);
        self.slots.resize(total, GONE);
        let (mut i, mut j) = (kept, recent.len());
        for k in (0..total).rev() {
            if j > 0 && (i == 0 || recent[j - 1].0 > self.ids[i - 1]) {
                j -= 1;
                (self.ids[k], self.slots[k]) = recent[j];
            } else {
                i -= 1;
                (self.ids[k], self.slots[k]) = (self.ids[i], self.slots[i]);
            }
        }
    }

    /// Whether an id is in the sorted part twice.
    fn has_duplicates(&self) -> bool {
        self.ids.windows(2).any(|w| w[0] == w[1])
    }
}

#[derive(Default)]
struct Slots {
    /// Slot index (0 is the first after the header) of each user.
    of: SlotIndex,
    free: Vec<u32>,
    /// Slots in the file after the header, free ones included.
    len: u32,
    /// A write to the file failed: it no longer matches the store, and the export walks
    /// the store instead until the next open builds it again.
    broken: bool,
    /// The header says the file matches the store (after [`RowFile::seal`]); a write
    /// after that must take it back first.
    sealed: bool,
}

pub(super) struct RowFile {
    path: PathBuf,
    file: File,
    slots: RwLock<Slots>,
    /// The token and marks [`RowFile::prepare_seal`] took, for [`RowFile::seal`].
    token: Mutex<Option<([u8; 16], [u8; 16])>>,
}

/// An I/O error on `path`, as the store reports it.
pub(super) fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{}: {e}", path.display()))
}

/// The header: what the file is, whether a clean close left it matching the store, the
/// token that close stored in the tree, and the tree's [`marks`] then.
fn header(clean: bool, token: [u8; 16], marks: [u8; 16]) -> [u8; SLOT] {
    let mut h = [0u8; SLOT];
    h[..16].copy_from_slice(MAGIC);
    h[16..20].copy_from_slice(&VERSION.to_le_bytes());
    h[20] = u8::from(clean);
    h[24..40].copy_from_slice(&token);
    h[40..44].copy_from_slice(&(SLOT as u32).to_le_bytes());
    h[44..60].copy_from_slice(&marks);
    h
}

/// The tenant's change and governance sequence numbers, which every write that changes
/// a record moves. Besides the token, they catch a store written by a rosterd that does
/// not know this file (an older version run on the directory between two clean stops):
/// that keeps the token, but moves them.
fn marks(tree: &sled::Tree) -> StoreResult<[u8; 16]> {
    let mut m = [0u8; 16];
    for (key, at) in [(keys::SEQ_KEY, 0), (keys::GSEQ_KEY, 8)] {
        if let Some(v) = tree.get(key)?
            && v.len() == 8
        {
            m[at..at + 8].copy_from_slice(&v);
        }
    }
    Ok(m)
}

fn offset(slot: u32) -> u64 {
    (u64::from(slot) + 1) * SLOT as u64
}

/// The slot bytes of a user's row: the record, then (if they fit) a count and the ids
/// of the groups the user is a direct member of.
fn encode(key: u128, record: &[u8], groups: Option<&[u128]>) -> [u8; SLOT] {
    let mut s = [0u8; SLOT];
    s[4..SLOT_HEAD].copy_from_slice(&key.to_be_bytes());
    if record.len() > ROOM {
        s[0] = STORED;
        return s;
    }
    s[0] = INLINE;
    s[2..4].copy_from_slice(&(record.len() as u16).to_le_bytes());
    let at = SLOT_HEAD + record.len();
    s[SLOT_HEAD..at].copy_from_slice(record);
    match groups {
        Some(g) if g.len() <= usize::from(u8::MAX) && at + 1 + 16 * g.len() <= SLOT => {
            s[at] = g.len() as u8;
            for (i, gid) in g.iter().enumerate() {
                s[at + 1 + 16 * i..at + 17 + 16 * i].copy_from_slice(&gid.to_be_bytes());
            }
        }
        _ => s[1] = GROUPS_ELSEWHERE,
    }
    s
}

/// A slot that holds a user, as [`decode`] reads it.
struct Slot<'a> {
    state: u8,
    key: u128,
    /// Empty unless `INLINE`.
    record: &'a [u8],
    /// Group ids, 16 bytes each; `None` if kept in the store only.
    groups: Option<&'a [u8]>,
}

/// The user in slot bytes `s`. `None` for a free slot or one no version of this file
/// writes.
fn decode(s: &[u8]) -> Option<Slot<'_>> {
    let key = u128::from_be_bytes(s[4..SLOT_HEAD].try_into().ok()?);
    match s[0] {
        INLINE => {
            let at = SLOT_HEAD + usize::from(u16::from_le_bytes([s[2], s[3]]));
            let groups = if s[1] & GROUPS_ELSEWHERE != 0 {
                None
            } else {
                let n = usize::from(*s.get(at)?);
                Some(s.get(at + 1..at + 1 + 16 * n)?)
            };
            Some(Slot {
                state: INLINE,
                key,
                record: s.get(SLOT_HEAD..at)?,
                groups,
            })
        }
        STORED => Some(Slot {
            state: STORED,
            key,
            record: &[],
            groups: None,
        }),
        _ => None,
    }
}

fn group_keys(packed: &[u8]) -> impl Iterator<Item = u128> + '_ {
    packed
        .chunks_exact(16)
        .filter_map(|c| c.try_into().ok().map(u128::from_be_bytes))
}

/// The group ids a slot packs ([`Row::Record`]'s `groups`), as the store writes them.
pub(super) fn group_ids(packed: &[u8]) -> impl Iterator<Item = String> + '_ {
    let mut text = uuid::Uuid::encode_buffer();
    group_keys(packed).map(move |k| id_text(k, &mut text).to_owned())
}

/// The groups `tree` says the user `id` is a direct member of, as the file keeps them;
/// `None` if one is not in the store's id form (the slot then says "ask the store").
fn groups_in_tree(tree: &sled::Tree, id: &str) -> StoreResult<Option<Vec<u128>>> {
    Ok(super::groups_in(tree, id)?
        .iter()
        .map(|g| id_key(g))
        .collect())
}

impl RowFile {
    /// Open the tenant's row file at `path`, building it from `tree`'s records unless a
    /// clean close left it matching them.
    pub(super) fn open(path: &Path, tree: &sled::Tree) -> StoreResult<RowFile> {
        if let Some(parent) = path.parent() {
            super::Store::create_private_dir(parent).map_err(|e| io(parent, e))?;
        }
        let token = tree.get(keys::ROWS_TOKEN_KEY)?;
        let reused = match (File::options().read(true).write(true).open(path), token) {
            (Ok(file), Some(token)) => Self::load(path, file, &token, marks(tree)?)?,
            _ => None,
        };
        let rows = match reused {
            Some(rows) => rows,
            None => Self::build(path, tree)?,
        };
        Ok(rows)
    }

    /// The file at `path` if a clean close vouched for it, without building it otherwise
    /// (`rosterd store check`). Opening it takes the vouching back, as any open does.
    pub(super) fn open_vouched(path: &Path, tree: &sled::Tree) -> StoreResult<Option<RowFile>> {
        let Some(token) = tree.get(keys::ROWS_TOKEN_KEY)? else {
            return Ok(None);
        };
        match File::options().read(true).write(true).open(path) {
            Ok(file) => Self::load(path, file, &token, marks(tree)?),
            Err(_) => Ok(None),
        }
    }

    /// The file at `path` as a clean close left it, if it did, with the tree's `token`
    /// and `marks` as they are now.
    fn load(
        path: &Path,
        file: File,
        token: &[u8],
        marks: [u8; 16],
    ) -> StoreResult<Option<RowFile>> {
        let mut h = [0u8; SLOT];
        if file.read_exact_at(&mut h, 0).is_err() || h != header(true, token_of(token), marks) {
            return Ok(None);
        }
        let size = file.metadata().map_err(|e| io(path, e))?.len();
        if size % SLOT as u64 != 0 {
            return Ok(None);
        }
        let len = u32::try_from(size / SLOT as u64 - 1).unwrap_or(u32::MAX);
        let mut slots = Slots {
            len,
            ..Slots::default()
        };
        let mut pairs = Vec::new();
        let mut buf = vec![0u8; CHUNK_SLOTS * SLOT];
        let mut first = 0u32;
        while first < len {
            let n = (len - first).min(CHUNK_SLOTS as u32) as usize;
            let chunk = &mut buf[..n * SLOT];
            file.read_exact_at(chunk, offset(first))
                .map_err(|e| io(path, e))?;
            for (i, s) in chunk.chunks_exact(SLOT).enumerate() {
                let slot = first + i as u32;
                match decode(s) {
                    Some(user) => pairs.push((user.key, slot)),
                    None if s[0] == FREE => slots.free.push(slot),
                    None => return Ok(None),
                }
            }
            first += n as u32;
        }
        // Taken from the end first, so the file's front fills up again.
        slots.free.reverse();
        slots.of = SlotIndex::from_pairs(pairs);
        if slots.of.has_duplicates() {
            // An id in two slots: not a file this module wrote.
            return Ok(None);
        }
        // No longer vouched for, and on disk before the store takes any write: a crash
        // part-way through a write is finished from the store's redo record at the next
        // open, which this file would not see.
        unseal(&file).map_err(|e| io(path, e))?;
        Ok(Some(RowFile {
            path: path.to_owned(),
            file,
            slots: RwLock::new(slots),
            token: Mutex::new(None),
        }))
    }

    /// Write the file anew from the records in `tree`, beside the old one, then put it
    /// in the old one's place.
    fn build(path: &Path, tree: &sled::Tree) -> StoreResult<RowFile> {
        let started = std::time::Instant::now();
        let tmp = path.with_extension("rows.new");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        let mut out = std::io::BufWriter::with_capacity(CHUNK_SLOTS * SLOT, &file);
        out.write_all(&header(false, [0; 16], [0; 16]))
            .map_err(|e| io(&tmp, e))?;
        let prefix = keys::record("");
        let mut slots = Slots::default();
        let mut pairs = Vec::new();
        // Records and memberships (`b member group`) are both in member id order: two
        // scans merged, not a lookup per user.
        let back = keys::backrefs_all_prefix();
        let mut memberships = tree.scan_prefix(&back).keys().peekable();
        let mut groups: Vec<u128> = Vec::new();
        for kv in tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[prefix.len()..]);
            let Some(key) = id_key(&id) else {
                return Err(io(&tmp, foreign_id(&id)));
            };
            groups.clear();
            let mut all_ours = true;
            while let Some(next) = memberships.peek() {
                let m = match next {
                    Ok(m) => m,
                    Err(_) => {
                        memberships.next().transpose()?;
                        continue;
                    }
                };
                let (member, gid) = keys::backref_parts(m).unwrap_or((&[], &[]));
                match member.cmp(id.as_bytes()) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        match id_key(std::str::from_utf8(gid).unwrap_or("")) {
                            Some(g) => groups.push(g),
                            None => all_ours = false,
                        }
                    }
                    std::cmp::Ordering::Greater => break,
                }
                memberships.next();
            }
            let groups = all_ours.then_some(groups.as_slice());
            out.write_all(&encode(key, &v, groups))
                .map_err(|e| io(&tmp, e))?;
            pairs.push((key, slots.len));
            slots.len += 1;
        }
        out.flush().map_err(|e| io(&tmp, e))?;
        drop(out);
        // Now, while the start's timeout is extended, rather than at the stop's seal.
        file.sync_data().map_err(|e| io(&tmp, e))?;
        slots.of = SlotIndex::from_pairs(pairs);
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
        if slots.len > 10_000 {
            tracing::info!(
                file = %path.display(),
                users = slots.of.len(),
                seconds = started.elapsed().as_secs_f64(),
                "Built the export's copy of the roster records."
            );
        }
        Ok(RowFile {
            path: path.to_owned(),
            file,
            slots: RwLock::new(slots),
            token: Mutex::new(None),
        })
    }

    /// Bring the file in line with a transaction's record writes (`None` deletes) and
    /// membership changes (member, group, added), just applied to `tree`. A failure
    /// leaves the file unused until the next open.
    pub(super) fn apply<'a>(
        &self,
        tree: &sled::Tree,
        changes: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
        memberships: impl Iterator<Item = (&'a str, &'a str, bool)>,
    ) {
        let mut slots = self.slots_mut();
        if slots.broken {
            return;
        }
        let applied = self
            .apply_locked(&mut slots, changes)
            .and_then(|()| self.apply_memberships(&slots, tree, memberships));
        if let Err(e) = applied {
            slots.broken = true;
            tracing::error!(
                file = %self.path.display(),
                error = %e,
                "Cannot write the export's copy of the roster records; exports read the store until the next start."
            );
        }
    }

    /// Stop using the file until the next open builds it again.
    pub(super) fn distrust(&self) {
        self.slots_mut().broken = true;
    }

    /// The slots, to change. A writer that panicked holding them may have left the
    /// index and the file apart: the file is not used again.
    fn slots_mut(&self) -> std::sync::RwLockWriteGuard<'_, Slots> {
        self.slots.write().unwrap_or_else(|e| {
            let mut slots = e.into_inner();
            slots.broken = true;
            slots
        })
    }

    fn apply_locked<'a>(
        &self,
        slots: &mut Slots,
        changes: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> std::io::Result<()> {
        if slots.sealed {
            unseal(&self.file)?;
            slots.sealed = false;
        }
        for (id, record) in changes {
            let Some(key) = id_key(id) else {
                return Err(foreign_id(id));
            };
            match record {
                Some(record) => {
                    let (slot, groups) = match slots.of.get(key) {
                        // Its groups as the slot has them.
                        Some(slot) => {
                            let mut old = [0u8; SLOT];
                            self.file.read_exact_at(&mut old, offset(slot))?;
                            (
                                slot,
                                decode(&old)
                                    .and_then(|u| u.groups)
                                    .map(|g| group_keys(g).collect::<Vec<_>>()),
                            )
                        }
                        // New: in no group yet (a membership in the same write marks it).
                        None => {
                            let slot = slots.free.pop().unwrap_or_else(|| {
                                slots.len += 1;
                                slots.len - 1
                            });
                            slots.of.insert(key, slot);
                            (slot, Some(Vec::new()))
                        }
                    };
                    let row = encode(key, record, groups.as_deref());
                    self.file.write_all_at(&row, offset(slot))?;
                }
                None => {
                    if let Some(slot) = slots.of.remove(key) {
                        self.file.write_all_at(&[FREE], offset(slot))?;
                        slots.free.push(slot);
                    }
                }
            }
        }
        Ok(())
    }

    /// Rewrite the group ids of each member a transaction added to or removed from a
    /// group, from the slot's own list and the changes: a 50,000-member PATCH rewrites
    /// 50,000 slots of the file (in the kernel's cache) but reads nothing from sled,
    /// whose cache a walk of the memberships would grow. Only a slot whose groups are
    /// kept in the store (too many to fit, or an id not in the store's form) asks the
    /// tree, which already holds the transaction.
    fn apply_memberships<'a>(
        &self,
        slots: &Slots,
        tree: &sled::Tree,
        memberships: impl Iterator<Item = (&'a str, &'a str, bool)>,
    ) -> std::io::Result<()> {
        // A PATCH's changes are all to one group: its id is read once.
        let mut last_group: (&str, Option<u128>) = ("", None);
        let mut changes: Vec<(u32, Option<u128>, bool)> = memberships
            // Groups can be members too, and a deleted user has no slot left.
            .filter_map(|(member, group, added)| {
                let slot = slots.of.get(id_key(member)?)?;
                if last_group.0 != group {
                    last_group = (group, id_key(group));
                }
                Some((slot, last_group.1, added))
            })
            .collect();
        // Stable: one member's changes stay in the transaction's order.
        changes.sort_by_key(|c| c.0);
        let mut buf = Vec::new();
        let mut text = uuid::Uuid::encode_buffer();
        let mut rest = changes.as_slice();
        while let Some(&(first, ..)) = rest.first() {
            // Slots close together are read and written back in one go: at 100,000
            // users a 50,000-member change is a few hundred calls instead of 100,000.
            let mut last = first;
            let mut n = 0;
            while let Some(&(slot, ..)) = rest.get(n) {
                if slot > last + RUN_GAP || slot - first >= CHUNK_SLOTS as u32 {
                    break;
                }
                last = slot;
                n += 1;
            }
            let (run, later) = rest.split_at(n);
            rest = later;
            let len = (last - first + 1) as usize * SLOT;
            buf.resize(len, 0);
            self.file.read_exact_at(&mut buf, offset(first))?;
            for member in run.chunk_by(|a, b| a.0 == b.0) {
                let at = (member[0].0 - first) as usize * SLOT;
                let s = &mut buf[at..at + SLOT];
                let Some(user) = decode(s).filter(|u| u.state == INLINE) else {
                    // Kept in the store only: the export reads its groups there too.
                    continue;
                };
                let known = user
                    .groups
                    .map(|g| group_keys(g).collect::<Vec<_>>())
                    .filter(|_| member.iter().all(|(_, g, _)| g.is_some()));
                let groups = match known {
                    Some(mut groups) => {
                        for &(_, group, added) in member {
                            let group = group.unwrap_or_default();
                            groups.retain(|g| *g != group);
                            if added {
                                groups.push(group);
                            }
                        }
                        Some(groups)
                    }
                    None => groups_in_tree(tree, id_text(user.key, &mut text))
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                };
                let row = encode(user.key, user.record, groups.as_deref());
                s.copy_from_slice(&row);
            }
            // The slots between are written back as read: every write to the file
            // holds the lock held here.
            self.file.write_all_at(&buf, offset(first))?;
        }
        Ok(())
    }

    /// Call `f` with every row, in slot order, until it returns false. `None` when the
    /// file cannot be trusted (a write failed): walk the store instead.
    pub(super) fn for_each(
        &self,
        mut f: impl FnMut(Row<'_>) -> StoreResult<bool>,
    ) -> Option<StoreResult<()>> {
        let mut buf = vec![0u8; CHUNK_SLOTS * SLOT];
        let mut text = uuid::Uuid::encode_buffer();
        let mut first = 0u32;
        loop {
            // Read under the lock, so no slot is read half-written; rows are handed out
            // after it is released.
            let n = {
                // Poisoned: a writer panicked part-way (see `slots_mut`).
                let slots = match self.slots.read() {
                    Ok(slots) if !slots.broken => slots,
                    _ if first == 0 => return None,
                    _ => {
                        return Some(Err(StoreError::Io(format!(
                            "{}: a write failed during the walk",
                            self.path.display()
                        ))));
                    }
                };
                if first >= slots.len {
                    return Some(Ok(()));
                }
                let n = (slots.len - first).min(CHUNK_SLOTS as u32) as usize;
                if let Err(e) = self.file.read_exact_at(&mut buf[..n * SLOT], offset(first)) {
                    return Some(Err(io(&self.path, e)));
                }
                n
            };
            for s in buf[..n * SLOT].chunks_exact(SLOT) {
                let Some(user) = decode(s) else {
                    continue;
                };
                let id = id_text(user.key, &mut text);
                let row = if user.state == INLINE {
                    Row::Record {
                        id,
                        bytes: user.record,
                        groups: user.groups,
                    }
                } else {
                    Row::Stored { id }
                };
                match f(row) {
                    Ok(true) => {}
                    Ok(false) => return Some(Ok(())),
                    Err(e) => return Some(Err(e)),
                }
            }
            first += n as u32;
        }
    }

    /// One user's row: `Some(None)` if the file has no such user, `Some(Some(bytes))`
    /// with its record, or `None` if the file cannot answer (not in use, a read error,
    /// or the record is kept in the store only): ask the store.
    pub(super) fn get(&self, id: &str) -> Option<Option<Vec<u8>>> {
        let key = id_key(id)?;
        // Poisoned: a writer panicked part-way (see `slots_mut`).
        let slots = self.slots.read().ok()?;
        if slots.broken {
            return None;
        }
        let Some(slot) = slots.of.get(key) else {
            return Some(None);
        };
        let mut s = [0u8; SLOT];
        self.file.read_exact_at(&mut s, offset(slot)).ok()?;
        match decode(&s) {
            Some(user) if user.state == INLINE && user.key == key => {
                Some(Some(user.record.to_vec()))
            }
            _ => None,
        }
    }

    /// First half of a clean close, before the store's last flush: the token that will
    /// say the file matches, stored in `tree`.
    pub(super) fn prepare_seal(&self, tree: &sled::Tree) -> StoreResult<()> {
        let token: [u8; 16] = rand::random();
        tree.insert(keys::ROWS_TOKEN_KEY, &token)?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some((token, marks(tree)?));
        Ok(())
    }

    /// Second half, after the store's flush made the token durable: the file, and then
    /// the header that vouches for it.
    pub(super) fn seal(&self) -> StoreResult<()> {
        let Some((token, marks)) = self.token.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return Ok(());
        };
        let mut slots = self.slots_mut();
        if slots.broken {
            return Ok(());
        }
        let sealed = self
            .file
            .sync_data()
            .and_then(|()| self.file.write_all_at(&header(true, token, marks), 0))
            .and_then(|()| self.file.sync_data());
        sealed.map_err(|e| io(&self.path, e))?;
        slots.sealed = true;
        Ok(())
    }
}

fn unseal(file: &File) -> std::io::Result<()> {
    file.write_all_at(&header(false, [0; 16], [0; 16]), 0)?;
    file.sync_data()
}

fn token_of(bytes: &[u8]) -> [u8; 16] {
    let mut t = [0u8; 16];
    if bytes.len() == 16 {
        t.copy_from_slice(bytes);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::super::testing::{create_user, set_user, user, when_unlocked};
    use super::super::{ROWS_DIR, Store};
    use super::*;
    use crate::scim::ResourceKind;
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    /// What the export walk yields, and what the tree holds: (id → userName, title).
    /// id → (userName, title, group ids sorted).
    type Rows = BTreeMap<String, (String, Option<String>, Vec<String>)>;

    fn sorted(mut groups: Vec<String>) -> Vec<String> {
        groups.sort();
        groups
    }

    /// The walk, each user's groups as the file gives them or else from the store; and
    /// how many users the file gave groups for.
    fn walked_counting(store: &Store) -> (Rows, usize) {
        let mut out = Rows::new();
        let mut from_file = 0;
        store
            .for_each_record("t", |id, r, groups| {
                from_file += usize::from(groups.is_some());
                let groups = match groups {
                    Some(g) => sorted(g.to_vec()),
                    None => sorted(store.groups_of("t", id).unwrap()),
                };
                let row = (
                    r.user.user_name.to_owned(),
                    r.user.title.map(str::to_owned),
                    groups,
                );
                assert!(out.insert(id.to_owned(), row).is_none(), "{id} twice");
                Ok(true)
            })
            .unwrap();
        (out, from_file)
    }

    fn walked(store: &Store) -> Rows {
        walked_counting(store).0
    }

    fn stored(store: &Store) -> Rows {
        store
            .scan_records_after("t", None)
            .unwrap()
            .map(|b| {
                let b = b.unwrap();
                let r = b.record().unwrap();
                (
                    b.id().to_owned(),
                    (
                        r.user.user_name.to_owned(),
                        r.user.title.map(str::to_owned),
                        sorted(store.groups_of("t", b.id()).unwrap()),
                    ),
                )
            })
            .collect()
    }

    /// The walk yields `n` users, exactly the tree's records.
    fn walks_as_stored(store: &Store, n: usize) {
        let rows = walked(store);
        assert_eq!(rows.len(), n);
        assert_eq!(rows, stored(store));
    }

    fn file(dir: &Path) -> PathBuf {
        // Tenant "t" is 0x74.
        dir.join(ROWS_DIR).join("74.rows")
    }

    /// Creates, updates (one to a record too large for a slot), deletes and a create
    /// that takes a freed slot.
    async fn churn(store: &Store, tag: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(create_user(store, user(&format!("{tag}{i}@x.test"), "Engineer", true)).await);
        }
        set_user(store, &ids[3], "Accountant", false).await;
        let long: &'static str = "Principal Engineer of Very Long Titles ".repeat(10).leak();
        set_user(store, &ids[4], long, true).await;
        for id in ids.drain(5..8) {
            store
                .delete("t", ResourceKind::User, &id, None)
                .await
                .unwrap();
        }
        ids.push(create_user(store, user(&format!("{tag}-late@x.test"), "Chef", true)).await);
        // Memberships: a group with users (one of them the user too long for a slot)
        // and a group, changed; a member deleted with its user; a user in many groups.
        let m = |id: &str| crate::scim::patch::MemberRef {
            value: id.to_owned(),
            kind: None,
            display: None,
        };
        let group = |name: String, members: Vec<crate::scim::patch::MemberRef>| async move {
            store
                .create(
                    "t",
                    ResourceKind::Group,
                    serde_json::json!({"displayName": name}),
                    members,
                )
                .await
                .unwrap()
                .id
        };
        let inner = group(format!("{tag} inner"), vec![m(&ids[1]), m(&ids[2])]).await;
        let outer = group(
            format!("{tag} outer"),
            vec![m(&ids[0]), m(&ids[1]), m(&ids[4]), m(&inner)],
        )
        .await;
        let (gone, added) = (ids[0].clone(), ids[9].clone());
        store
            .update("t", ResourceKind::Group, &outer, None, move |doc| {
                Ok(super::super::Update {
                    doc: doc.clone(),
                    members: vec![
                        crate::scim::patch::MemberOp::Remove(vec![gone]),
                        crate::scim::patch::MemberOp::Add(vec![m(&added)]),
                    ],
                })
            })
            .await
            .unwrap();
        for i in 0..30 {
            group(format!("{tag} many {i}"), vec![m(&ids[10])]).await;
        }
        let doomed = create_user(store, user(&format!("{tag}-doomed@x.test"), "Chef", true)).await;
        group(format!("{tag} doomed"), vec![m(&doomed), m(&ids[11])]).await;
        store
            .delete("t", ResourceKind::User, &doomed, None)
            .await
            .unwrap();
        ids
    }

    #[test]
    fn the_slot_index_answers_as_a_map_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut index =
            SlotIndex::from_pairs((0..5000u32).map(|s| (u128::from(s) * 7919, s)).collect());
        let mut map: HashMap<u128, u32> = (0..5000u32).map(|s| (u128::from(s) * 7919, s)).collect();
        // Ids from a range small enough that inserts, updates and removals of the same
        // id meet, and enough operations for several merges.
        for step in 0..200_000u32 {
            let id = u128::from(rng.random_range(0..40_000u32)) * 7919;
            match rng.random_range(0..3) {
                0 => assert_eq!(index.remove(id), map.remove(&id), "step {step}"),
                _ => {
                    index.insert(id, step);
                    map.insert(id, step);
                }
            }
            if step % 997 == 0 {
                assert_eq!(index.len(), map.len(), "step {step}");
            }
        }
        assert!(!index.has_duplicates());
        for id in (0..40_000u128).map(|i| i * 7919) {
            assert_eq!(index.get(id), map.get(&id).copied(), "id {id}");
        }
    }

    /// Write tenant "t"'s tree in the closed store in `dir` directly, as a program that
    /// knows nothing of the row file would: `write` gets the tree and its first record's
    /// key and value; the change sequence then moves, as every write moves it.
    fn behind_its_back(dir: &Path, write: impl FnOnce(&sled::Tree, sled::IVec, sled::IVec)) {
        let db = when_unlocked(|| sled::open(dir));
        let tree = db.open_tree("tenant/t").unwrap();
        let (k, v) = tree.scan_prefix(keys::record("")).next().unwrap().unwrap();
        write(&tree, k, v);
        let seq = tree.get(keys::SEQ_KEY).unwrap().unwrap();
        let next = u64::from_be_bytes(seq.as_ref().try_into().unwrap()) + 1;
        tree.insert(keys::SEQ_KEY, &next.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }

    /// A store in `dir` with [`churn`]'s users, closed cleanly.
    async fn churned_and_closed(dir: &Path) {
        let store = when_unlocked(|| Store::open(dir));
        churn(&store, "a").await;
        store.close().unwrap();
    }

    #[tokio::test]
    async fn the_walk_sees_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        churn(&store, "a").await;
        let rows = walked(&store);
        assert_eq!(rows.len(), 18);
        assert_eq!(rows, stored(&store));
        // One user at a time (the export's manager lookups), the long one from the tree.
        for (id, (name, title, _)) in &rows {
            let b = store.roster_record_unpaged("t", id).unwrap().unwrap();
            let r = b.record().unwrap();
            assert_eq!(
                (b.id(), r.user.user_name, r.user.title),
                (id.as_str(), name.as_str(), title.as_deref())
            );
        }
        // And from the file, not the tree: a title changed there alone shows.
        let accountant = rows
            .iter()
            .find(|(_, (_, t, _))| t.as_deref() == Some("Accountant"))
            .unwrap()
            .0;
        let mut bytes = std::fs::read(file(dir.path())).unwrap();
        let at = bytes.windows(10).position(|w| w == b"Accountant").unwrap();
        bytes[at + 9] = b'x';
        std::fs::write(file(dir.path()), &bytes).unwrap();
        let b = store
            .roster_record_unpaged("t", accountant)
            .unwrap()
            .unwrap();
        assert_eq!(b.record().unwrap().user.title, Some("Accountanx"));
        let nobody = uuid::Uuid::new_v4().to_string();
        assert!(store.roster_record_unpaged("t", &nobody).unwrap().is_none());
        assert!(
            store
                .roster_record_unpaged("t", "not-an-id")
                .unwrap()
                .is_none()
        );
        assert!(
            rows.values()
                .any(|(_, t, _)| t.as_ref().is_some_and(|t| t.len() > ROOM)),
            "the long title is walked from the store"
        );
        // The freed slot was taken again: 20 created, 3 deleted, 1 more created.
        let len = std::fs::metadata(file(dir.path())).unwrap().len();
        assert_eq!(len, 21 * SLOT as u64);
        // Stopping early stops.
        let mut n = 0;
        store
            .for_each_record("t", |_, _, _| {
                n += 1;
                Ok(n < 5)
            })
            .unwrap();
        assert_eq!(n, 5);
    }

    #[tokio::test]
    async fn a_clean_close_keeps_the_file_and_anything_else_builds_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path());
        churned_and_closed(dir.path()).await;
        let sealed = std::fs::read(&path).unwrap();
        assert_eq!(sealed[20], 1, "the header vouches for the file");
        let inode = std::fs::metadata(&path).unwrap().ino();
        {
            let store = when_unlocked(|| Store::open(dir.path()));
            // Opened from the file as it is, which says at once that it no longer
            // vouches for itself: a crash from here on must not find it trusted.
            churn(&store, "b").await;
            assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
            assert_eq!(std::fs::read(&path).unwrap()[20], 0);
            walks_as_stored(&store, 36);
            store.close().unwrap();
        }
        // A sealed file from an earlier close (a restored backup, say) does not match
        // the store's token: built again, and the rows from the second run are there.
        std::fs::write(&path, &sealed).unwrap();
        {
            let store = when_unlocked(|| Store::open(dir.path()));
            let rows = walked(&store);
            assert_eq!(rows.len(), 36);
            assert_eq!(rows, stored(&store));
            assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
            // No close: the next open cannot trust what this run wrote.
            churn(&store, "c").await;
        }
        let store = when_unlocked(|| Store::open(dir.path()));
        walks_as_stored(&store, 54);
    }

    #[tokio::test]
    async fn a_store_written_by_a_version_without_the_file_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        churned_and_closed(dir.path()).await;
        // An older rosterd run between two clean stops knows nothing of the file: it
        // keeps the token, and its write (here a user's record removed) moves the
        // tenant's sequence.
        behind_its_back(dir.path(), |tree, k, _| {
            tree.remove(k).unwrap();
        });
        let store = when_unlocked(|| Store::open(dir.path()));
        walks_as_stored(&store, 17);
    }

    #[tokio::test]
    async fn an_upgraded_store_gets_the_file_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path());
        churned_and_closed(dir.path()).await;
        let inode = std::fs::metadata(&path).unwrap().ino();
        {
            let db = when_unlocked(|| sled::open(dir.path()));
            db.insert(super::super::SCHEMA_VERSION_KEY, b"4").unwrap();
            db.flush().unwrap();
        }
        let store = when_unlocked(|| Store::open(dir.path()));
        assert_eq!(walked(&store).len(), 18);
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
    }

    /// A write still in flight when the store closes (a reclassification's batch) waits
    /// for the seal; had it landed between the token and the seal, a process that exits
    /// without the store's last flush (a blocking task still holding it) would leave a
    /// file vouched for with a row the store never got.
    #[tokio::test]
    async fn a_write_during_the_close_is_not_sealed_into_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        churn(&store, "a").await;
        let mut late = None;
        let _ = store.close_with(|| {
            let store = store.clone();
            late = Some(std::thread::spawn(move || {
                let rt = crate::store::testing::runtime();
                rt.block_on(create_user_result(&store, "late@x.test"))
            }));
            // Time for the write to land, if nothing holds it.
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        let late = late.unwrap().join().unwrap();
        assert!(late.is_err(), "the store was closed: {late:?}");
        // The disk as a process that exits now, without another flush, leaves it.
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.path().join("."))
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(copied.success());
        std::mem::forget(store);
        let store = when_unlocked(|| Store::open(copy.path()));
        let rows = walked(&store);
        assert_eq!(rows, stored(&store));
        // The refused write may still be on disk (sled's own flusher writes what reached
        // its tree), as a write cut short by a crash may; churn's 18 users must be.
        let names: Vec<&str> = rows.values().map(|v| v.0.as_str()).collect();
        let late_landed = names.contains(&"late@x.test");
        assert_eq!(rows.len(), 18 + usize::from(late_landed), "{names:?}");
    }

    async fn create_user_result(store: &Store, name: &str) -> StoreResult<String> {
        store
            .create("t", ResourceKind::User, user(name, "Chef", true), vec![])
            .await
            .map(|r| r.id)
    }

    /// A user as Entra ID or Okta sends one: a manager, an externalId, two addresses, a
    /// title, a department, an assignment.
    #[tokio::test]
    async fn a_typical_enterprise_user_fits_a_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        store.set_resolver("t", std::sync::Arc::new(super::super::testing::Doubtful));
        let boss = create_user(&store, user("boss@contoso.com", "CTO", true)).await;
        let id = create_user(
            &store,
            serde_json::json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
                "userName": "jane.doe@contoso.com",
                "externalId": "5f0c8a5e-2b7d-4c1e-9b51-0c7c1d2e3f40",
                "name": {"givenName": "Jane", "familyName": "Doe"},
                "emails": [{"value": "jane.doe@contoso.com", "type": "work", "primary": true},
                           {"value": "jdoe@contoso.onmicrosoft.com", "type": "other"}],
                "title": "Senior Software Engineer",
                "active": true,
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":
                    {"department": "Platform Engineering", "manager": {"value": boss}},
            }),
        )
        .await;
        let tree = &store.tenant("t").unwrap().tree;
        let len = tree.get(keys::record(&id)).unwrap().unwrap().len();
        assert!(len > 200, "a realistic record: {len} bytes");
        let bytes = std::fs::read(file(dir.path())).unwrap();
        let states: Vec<u8> = bytes[SLOT..].chunks(SLOT).map(|s| s[0]).collect();
        assert_eq!(states, [INLINE, INLINE], "{len} bytes, room for {ROOM}");
    }

    /// The store's size counts the row file: at a million users it is 384 MB that
    /// sled's own figure leaves out.
    #[tokio::test]
    async fn the_store_size_counts_the_row_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        churn(&store, "a").await;
        let rows = std::fs::metadata(file(dir.path())).unwrap().len();
        assert!(rows > 10 * SLOT as u64, "{rows} bytes");
        let sled = store.inner.db.size_on_disk().unwrap();
        assert_eq!(store.size_on_disk().unwrap(), sled + rows);
    }

    /// A record under an id the file cannot hold (none the store writes today): the
    /// file is not used, and the walk still yields every user, from the tree.
    #[tokio::test]
    async fn a_user_the_file_cannot_hold_is_still_walked() {
        let dir = tempfile::tempdir().unwrap();
        churned_and_closed(dir.path()).await;
        behind_its_back(dir.path(), |tree, _, v| {
            tree.insert(keys::record("NOT-A-UUID"), v).unwrap();
        });
        let store = when_unlocked(|| Store::open(dir.path()));
        walks_as_stored(&store, 19);
    }

    #[test]
    fn a_second_close_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        store.close().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let again = store.clone();
        std::thread::spawn(move || tx.send(again.close().is_ok()));
        let closed = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(closed, Ok(true), "a second close hung or failed");
    }

    /// A writer that panicked holding the tenant's lock may have applied part of its
    /// batch to the tree only: the file is not used again.
    #[tokio::test]
    async fn a_writer_that_panicked_stops_the_file_being_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        churn(&store, "a").await;
        let t = store.tenant("t").unwrap();
        let poisoned = std::thread::spawn(move || {
            let _held = t.write_lock.lock().unwrap();
            panic!("a writer panics");
        })
        .join();
        assert!(poisoned.is_err());
        create_user(&store, user("after@x.test", "Chef", true)).await;
        // What the file says no longer counts: a title changed there alone is not seen.
        let mut bytes = std::fs::read(file(dir.path())).unwrap();
        let at = bytes.windows(10).position(|w| w == b"Accountant").unwrap();
        bytes[at + 9] = b'x';
        std::fs::write(file(dir.path()), &bytes).unwrap();
        walks_as_stored(&store, 19);
        store.close().unwrap();
        assert_eq!(
            std::fs::read(file(dir.path())).unwrap()[20],
            0,
            "not sealed"
        );
    }

    /// The groups column: from the file for every user whose groups fit, as membership
    /// changes land, after a clean close and after a build; from the store for the user
    /// too long for a slot and the one in too many groups.
    #[tokio::test]
    async fn groups_come_from_the_file_as_memberships_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        churn(&store, "a").await;
        let (rows, from_file) = walked_counting(&store);
        assert_eq!(rows, stored(&store));
        assert!(rows.values().any(|(_, _, g)| g.len() == 2), "{rows:?}");
        assert_eq!(from_file, rows.len() - 2);
        // Out of too many groups: back in the file.
        let crowded = rows.iter().find(|(_, (_, _, g))| g.len() == 30).unwrap().0;
        for gid in store.groups_of("t", crowded).unwrap().into_iter().skip(2) {
            store
                .delete("t", ResourceKind::Group, &gid, None)
                .await
                .unwrap();
        }
        let (rows, from_file) = walked_counting(&store);
        assert_eq!(rows, stored(&store));
        assert_eq!(rows[crowded].2.len(), 2);
        assert_eq!(from_file, rows.len() - 1);
        store.close().unwrap();
        drop(store);
        let store = when_unlocked(|| Store::open(dir.path()));
        let (rows, from_file) = walked_counting(&store);
        assert_eq!(rows, stored(&store));
        assert_eq!(from_file, rows.len() - 1);
        drop(store);
        // No close: built again, the memberships merged in.
        let store = when_unlocked(|| Store::open(dir.path()));
        let (rows, from_file) = walked_counting(&store);
        assert_eq!(rows, stored(&store));
        assert_eq!(from_file, rows.len() - 1);
    }

    #[tokio::test]
    async fn a_damaged_file_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path());
        churned_and_closed(dir.path()).await;
        // A slot with a state no version writes, and a file cut mid-slot.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT * 2] = 9;
        std::fs::write(&path, &bytes).unwrap();
        {
            let store = when_unlocked(|| Store::open(dir.path()));
            walks_as_stored(&store, 18);
            store.close().unwrap();
        }
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len((SLOT * 5 + 7) as u64).unwrap();
        let store = when_unlocked(|| Store::open(dir.path()));
        assert_eq!(walked(&store).len(), 18);
    }
}
