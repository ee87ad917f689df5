//! Sparse TF-IDF features of a normalized title.
//!
//! Features are identified by a 64-bit FNV hash of (namespace, text) so the
//! vocabulary needs no string storage and lookups are one hash probe; the
//! index of a feature is its rank in sorted-hash order, which keeps the
//! learned model independent of `HashMap` iteration order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Feature groups are L2-normalized separately, then weighted, so a long
/// title's many character n-grams cannot drown out its few word features.
pub(crate) const GROUPS: usize = 4;
const G_WORD: u8 = 0;
const G_CHAR: u8 = 1;
const G_POS: u8 = 2;
const G_DEPT: u8 = 3;

const GROUP_SHIFT: u32 = 30;
const INDEX_MASK: u32 = (1 << GROUP_SHIFT) - 1;
// The group rides in the bits above GROUP_SHIFT while vectorizing; a fifth group would
// silently wrap into group 0, so adding one must move the shift.
const _: () = assert!(GROUPS <= 1 << (32 - GROUP_SHIFT));

const NS_WORD: u8 = b'w';
const NS_BIGRAM: u8 = b'b';
const NS_CHAR: u8 = b'c';
const NS_FIRST: u8 = b'f';
const NS_LAST: u8 = b'l';

/// Hyperparameters of the feature map, chosen by cross-validation on the SOC
/// examples (see `examples/evaluate.rs`), not on the held-out dev titles.
#[derive(Debug, Clone)]
pub(crate) struct FeatureConfig {
    pub char_min: usize,
    pub char_max: usize,
    pub group_weight: [f32; GROUPS],
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            char_min: 3,
            char_max: 5,
            // Characters outweigh words: short titles share few whole words
            // with the examples but many n-grams ("-man", "machin-").
            group_weight: [1.0, 1.5, 0.35, 0.35],
        }
    }
}

/// A raw feature occurrence: (hash, group, count).
pub(crate) type RawFeature = (u64, u8, u16);

/// (feature index, value)
pub(crate) type SparseVec = Vec<(u32, f32)>;

/// Keys are already FNV hashes; a multiply-shift finalizer is enough to
/// spread them over buckets and is much cheaper than SipHash.
#[derive(Default)]
pub(crate) struct PremixedHasher(u64);

impl Hasher for PremixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        let x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
}

pub(crate) type FastMap<V> = HashMap<u64, V, BuildHasherDefault<PremixedHasher>>;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    h
}

fn key(ns: u8, parts: &[&str]) -> u64 {
    let mut h = fnv_bytes(FNV_OFFSET, &[ns]);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h = fnv_bytes(h, b" ");
        }
        h = fnv_bytes(h, p.as_bytes());
    }
    h
}

/// Puts the raw features of a normalized title in `out`, merged and sorted by key.
pub(crate) fn extract(norm: &str, cfg: &FeatureConfig, out: &mut Vec<RawFeature>) {
    out.clear();
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    for (i, w) in words.iter().enumerate() {
        out.push((key(NS_WORD, &[w]), G_WORD, 1));
        if i + 1 < words.len() {
            out.push((key(NS_BIGRAM, &[w, words[i + 1]]), G_WORD, 1));
        }
        char_ngrams(w, cfg, out);
    }
    // Where the role word sits depends on the title style ("senior software
    // engineer" vs. the index style "cleaner, textile mfr"), so both ends get
    // their own features and the model learns which one matters.
    if let (Some(first), Some(last)) = (words.first(), words.last()) {
        out.push((key(NS_FIRST, &[first]), G_POS, 1));
        out.push((key(NS_LAST, &[last]), G_POS, 1));
    }
    merge(out);
}

/// Puts the raw features of a normalized department in `out`, merged and sorted by key.
/// They are a group of their own, scaled apart from the title's, so a title's vector
/// with its department is the title's alone plus these: the classifier adds their share
/// to the title's logits instead of reading the title twice.
pub(crate) fn extract_dept(dept: &str, out: &mut Vec<RawFeature>) {
    out.clear();
    // Department words share the title-word namespace so that they reuse what the
    // examples taught about e.g. "finance" or "engineering".
    for w in dept.split(' ').filter(|w| !w.is_empty()) {
        out.push((key(NS_WORD, &[w]), G_DEPT, 1));
    }
    merge(out);
}

/// Sorts raw features by key and group and adds up the counts of equal ones.
fn merge(out: &mut Vec<RawFeature>) {
    out.sort_unstable_by_key(|&(k, g, _)| (k, g));
    out.dedup_by(|next, kept| {
        if next.0 == kept.0 && next.1 == kept.1 {
            kept.2 = kept.2.saturating_add(next.2);
            true
        } else {
            false
        }
    });
}

fn char_ngrams(word: &str, cfg: &FeatureConfig, out: &mut Vec<RawFeature>) {
    // Word-boundary markers make prefixes and suffixes ("-man", "-ist")
    // distinct from the same letters mid-word. Byte n-grams: titles are
    // overwhelmingly ASCII, and for the rest a byte n-gram is still a
    // consistent (if less linguistic) feature.
    let bytes = word.as_bytes();
    let len = bytes.len() + 2;
    let at = |i: usize| -> u8 {
        if i == 0 {
            b'<'
        } else if i == len - 1 {
            b'>'
        } else {
            bytes[i - 1]
        }
    };
    let seed = fnv_bytes(FNV_OFFSET, &[NS_CHAR]);
    for start in 0..len {
        // FNV is incremental, so all n-grams starting here share one pass.
        let mut h = seed;
        for n in 1..=cfg.char_max {
            let end = start + n;
            if end > len {
                break;
            }
            h = (h ^ u64::from(at(end - 1))).wrapping_mul(FNV_PRIME);
            if n >= cfg.char_min {
                out.push((h, G_CHAR, 1));
            }
        }
    }
}

/// Vocabulary and IDF learned from one set of training documents.
#[derive(Debug, Clone)]
pub(crate) struct FeatureSpace {
    index: FastMap<u32>,
    idf: Vec<f32>,
    /// IDF assumed for features never seen in training: they still count
    /// toward a title's length, so an unfamiliar title yields weak evidence
    /// instead of letting its one familiar n-gram speak at full strength.
    unseen_idf: f32,
    group_weight: [f32; GROUPS],
}

impl FeatureSpace {
    /// `max_features` bounds the vocabulary: past it, the features in the fewest documents
    /// are left out (they are the rare character n-grams, which say least).
    pub(crate) fn build<'a>(
        docs: impl Iterator<Item = &'a [RawFeature]>,
        cfg: &FeatureConfig,
        max_features: usize,
    ) -> FeatureSpace {
        let mut df: FastMap<u32> = FastMap::default();
        let mut n_docs = 0u32;
        for doc in docs {
            n_docs += 1;
            let mut prev = None;
            for &(k, _, _) in doc {
                if prev != Some(k) {
                    *df.entry(k).or_insert(0) += 1;
                    prev = Some(k);
                }
            }
        }
        let mut keys: Vec<(u64, u32)> = df.into_iter().collect();
        if keys.len() > max_features {
            // Most documents first, ties by key: the same bundle keeps the same features.
            keys.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            keys.truncate(max_features);
        }
        keys.sort_unstable();
        let n = f64::from(n_docs);
        let idf_of = |d: u32| ((1.0 + n) / (1.0 + f64::from(d))).ln() as f32 + 1.0;
        let mut index = FastMap::with_capacity_and_hasher(keys.len(), Default::default());
        let mut idf = Vec::with_capacity(keys.len());
        // Far beyond any bundle, but the index must fit below GROUP_SHIFT.
        keys.truncate(INDEX_MASK as usize);
        for (i, &(k, d)) in keys.iter().enumerate() {
            index.insert(k, i as u32);
            idf.push(idf_of(d));
        }
        FeatureSpace {
            index,
            idf,
            unseen_idf: idf_of(0),
            group_weight: cfg.group_weight,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.idf.len()
    }

    /// Sublinear TF-IDF, each group scaled to unit length times its weight.
    /// Returns the number of known (in-vocabulary) title features.
    pub(crate) fn vectorize(&self, raw: &[RawFeature], out: &mut SparseVec) -> usize {
        out.clear();
        let mut norm2 = [0f32; GROUPS];
        let mut known_title = 0;
        for &(k, g, count) in raw {
            let tf = 1.0 + f32::from(count).ln();
            match self.index.get(&k) {
                Some(&i) => {
                    let w = tf * self.idf[i as usize];
                    norm2[usize::from(g)] += w * w;
                    // The group rides in the top bits until scaling below;
                    // indices never get near 2^30.
                    out.push((i | (u32::from(g) << GROUP_SHIFT), w));
                    if g != G_DEPT {
                        known_title += 1;
                    }
                }
                None => {
                    let w = tf * self.unseen_idf;
                    norm2[usize::from(g)] += w * w;
                }
            }
        }
        let mut scale = [0f32; GROUPS];
        for g in 0..GROUPS {
            if norm2[g] > 0.0 {
                scale[g] = self.group_weight[g] / norm2[g].sqrt();
            }
        }
        for entry in out.iter_mut() {
            let g = (entry.0 >> GROUP_SHIFT) as usize;
            entry.0 &= INDEX_MASK;
            entry.1 *= scale[g];
        }
        known_title
    }
}
