//! Layout upgrades: the layout version a store records, and what brings an older store's
//! tenants to this one before it serves.

use super::{
    SCHEMA_VERSION, SCHEMA_VERSION_KEY, StoreResult, counts, delivery, keys, record,
    recover_intent, roster,
};

/// The writes of a layout upgrade, applied in sled batches of 10,000. An upgrade runs
/// before the store serves and only adds keys derived from stored ones, so a crash
/// part-way just runs it again: no redo record is needed, and batches keep it fast.
pub(super) struct UpgradeWriter<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    pending: usize,
}

impl<'a> UpgradeWriter<'a> {
    const BATCH: usize = 10_000;

    pub(super) fn new(tree: &'a sled::Tree) -> UpgradeWriter<'a> {
        UpgradeWriter {
            tree,
            batch: sled::Batch::default(),
            pending: 0,
        }
    }

    pub(super) fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> StoreResult<()> {
        self.batch.insert(key, value);
        self.pending += 1;
        if self.pending == Self::BATCH {
            self.tree.apply_batch(std::mem::take(&mut self.batch))?;
            self.pending = 0;
        }
        Ok(())
    }

    pub(super) fn finish(self) -> StoreResult<()> {
        Ok(self.tree.apply_batch(self.batch)?)
    }
}

/// Bring every tenant from an older layout to this one, then record the new version.
/// Layout 1 had no roster records and no index of inactive users; layout 2 had no
/// counters; layout 3 did not index governance events by user and kind; layout 4 had no
/// archetype counters; layout 5 counted dead letters by walking them; layout 6 took a
/// user's names from `name` alone, untrimmed (see `scim::names`). Runs before the store
/// serves anything.
pub(super) fn upgrade(db: &sled::Db, from: u64) -> StoreResult<()> {
    for name in db.tree_names() {
        let Some(tenant) = name.strip_prefix(b"tenant/") else {
            continue;
        };
        let tenant = String::from_utf8_lossy(tenant).into_owned();
        let tree = db.open_tree(&name)?;
        recover_intent(&tree)?;
        // An upgrade may rewrite records without moving the sequence numbers the export's
        // row file checks: build it again rather than trust it.
        tree.remove(keys::ROWS_TOKEN_KEY)?;
        let started = std::time::Instant::now();
        // Layout 1 had no records; up to 6 they held names as `name` had them, where
        // the derivation now trims them and falls back to a full name: `store check`
        // would call every such record wrong. The counters count nothing a name changes.
        if from < 7 {
            let users = record::build_all(&tree)?;
            tracing::info!(
                tenant,
                users,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's roster records to layout version 7 (names trimmed, else taken from a full name)."
            );
        }
        if from < 3 {
            let [users, groups, inactive, review] = counts::build_all(&tree)?;
            tracing::info!(
                tenant,
                users,
                groups,
                inactive,
                review,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 3 (counters)."
            );
        }
        if from < 4 {
            let events = roster::index_governance(&tree)?;
            tracing::info!(
                tenant,
                events,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 4 (governance events by user and kind)."
            );
        }
        if from < 5 {
            let archetypes = counts::build_archetypes(&tree)?;
            tracing::info!(
                tenant,
                archetypes,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 5 (users per archetype counted)."
            );
        }
        if from < 6 {
            let letters = delivery::build_dead_counts(&tree)?;
            tracing::info!(
                tenant,
                letters,
                secs = started.elapsed().as_secs_f64(),
                "Upgraded the tenant's data to layout version 6 (dead letters counted)."
            );
        }
    }
    db.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
    db.flush()?;
    Ok(())
}

/// The layout version a store records: `None` for none, `u64::MAX` for one unreadable.
pub(super) fn stored_schema(db: &sled::Db) -> StoreResult<Option<u64>> {
    Ok(db.get(SCHEMA_VERSION_KEY)?.map(|v| {
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    }))
}
