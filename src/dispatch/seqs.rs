//! Sets of change numbers kept as ranges: the changes a connector has acknowledged above
//! its cursor. Behind one object failing for a day, a million others go through in near
//! order; kept one by one, each save of the cursor (five a second while busy) rebuilt and
//! sorted a list of all of them (176 ms a save at a million, in a debug build), and they
//! held tens of megabytes.

/// Change numbers, as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seqs(Vec<(u64, u64)>);

impl Seqs {
    /// Add `seq`. Cheapest at the end, where changes mostly finish.
    pub fn insert(&mut self, seq: u64) {
        let ranges = &mut self.0;
        // The first range that starts after `seq`.
        let i = ranges.partition_point(|&(start, _)| start <= seq);
        if i > 0 && ranges[i - 1].1 >= seq {
            return;
        }
        let joins_before = i > 0 && ranges[i - 1].1 + 1 == seq;
        let joins_after = i < ranges.len() && ranges[i].0 == seq + 1;
        match (joins_before, joins_after) {
            (true, true) => {
                ranges[i - 1].1 = ranges[i].1;
                ranges.remove(i);
            }
            (true, false) => ranges[i - 1].1 = seq,
            (false, true) => ranges[i].0 = seq,
            (false, false) => ranges.insert(i, (seq, seq)),
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.end_of(seq).is_some()
    }

    /// The last number of the range that holds `seq`, if one does.
    pub fn end_of(&self, seq: u64) -> Option<u64> {
        let i = self.0.partition_point(|&(start, _)| start <= seq);
        (i > 0 && self.0[i - 1].1 >= seq).then(|| self.0[i - 1].1)
    }

    /// Whether a number above `seq` is held.
    pub fn any_above(&self, seq: u64) -> bool {
        self.0.last().is_some_and(|&(_, end)| end > seq)
    }

    /// The changes an operator skipped at a hold, from the store's ranges (`after`,
    /// `through`] ([`crate::store::Store::guard_skipped`]).
    pub fn skipped(ranges: &[(u64, u64)]) -> Seqs {
        let mut out = Seqs::default();
        out.extend(&Seqs(
            ranges
                .iter()
                .filter(|&&(after, through)| after < through)
                .map(|&(after, through)| (after + 1, through))
                .collect(),
        ));
        out
    }

    /// Forget every number up to `cursor`.
    pub fn remove_through(&mut self, cursor: u64) {
        let i = self.0.partition_point(|&(_, end)| end <= cursor);
        self.0.drain(..i);
        if let Some(first) = self.0.first_mut() {
            first.0 = first.0.max(cursor.saturating_add(1));
        }
    }

    /// Every number of `other` too, range by range.
    pub fn extend(&mut self, other: &Seqs) {
        let mut all: Vec<(u64, u64)> = self.0.iter().chain(&other.0).copied().collect();
        all.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (start, end) in all {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        self.0 = merged;
    }

    /// The numbers in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|&(start, end)| start..=end)
    }
}

impl FromIterator<u64> for Seqs {
    fn from_iter<I: IntoIterator<Item = u64>>(seqs: I) -> Self {
        let mut out = Seqs::default();
        for seq in seqs {
            out.insert(seq);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_what_a_list_would() {
        // Against a plain set, over inserts in every order the follower meets: in order,
        // out of order, repeated, joining two ranges.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let mut seqs = Seqs::default();
            let mut list = std::collections::BTreeSet::new();
            for _ in 0..300 {
                let seq = next() % 400;
                seqs.insert(seq);
                list.insert(seq);
                if next() % 50 == 0 {
                    let cursor = next() % 400;
                    seqs.remove_through(cursor);
                    list.retain(|&s| s > cursor);
                }
            }
            assert_eq!(
                seqs.iter().collect::<Vec<_>>(),
                list.iter().copied().collect::<Vec<_>>()
            );
            for probe in 0..400 {
                assert_eq!(seqs.contains(probe), list.contains(&probe), "{probe}");
            }
            // Kept as ranges: none touches the next.
            assert!(seqs.0.windows(2).all(|w| w[0].1 + 1 < w[1].0), "{seqs:?}");
            let other: Seqs = (0..400).filter(|_| next() % 7 == 0).collect();
            let mut both = seqs.clone();
            both.extend(&other);
            let want: std::collections::BTreeSet<u64> =
                list.iter().copied().chain(other.iter()).collect();
            assert_eq!(
                both.iter().collect::<Vec<_>>(),
                want.into_iter().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn skipped_ranges_read_as_the_store_keeps_them() {
        // (after, through]: the change `after` itself was read before the hold.
        let skipped = Seqs::skipped(&[(10, 20), (20, 25), (30, 30), (40, 41)]);
        assert_eq!(skipped.0, [(11, 25), (41, 41)]);
        assert!(!skipped.contains(10) && skipped.contains(11) && skipped.contains(25));
        assert_eq!(skipped.end_of(12), Some(25));
        assert_eq!(skipped.end_of(26), None);
        assert!(skipped.any_above(40) && !skipped.any_above(41));
    }

    #[test]
    fn a_million_in_near_order_are_a_few_ranges() {
        let mut seqs = Seqs::default();
        for seq in (2..1_000_002).filter(|s| s % 100_000 != 0) {
            seqs.insert(seq);
        }
        assert_eq!(seqs.0.len(), 11);
        assert!(seqs.contains(999_999) && !seqs.contains(100_000) && !seqs.contains(1));
    }
}
