//! Deterministic job-title classifier: maps a free-text job title (and
//! optionally a department) to one of a tenant's archetypes, with a
//! calibrated confidence.
//!
//! Model: sparse TF-IDF features of the normalized title (word uni- and
//! bigrams, character 3–5-grams, first/last word) feeding a multinomial
//! logistic regression trained at bundle load; an exact match of a
//! normalized example short-circuits it. Confidence comes from an isotonic
//! map fitted on k-fold out-of-fold predictions over the bundle's own
//! examples (see `calibrate.rs`), so no labeled data beyond the bundle is
//! needed.

mod bundle;
mod calibrate;
mod features;
mod model;
mod normalize;
pub mod policy;

use std::collections::HashMap;

use serde::Serialize;

pub use bundle::{Archetype, Bundle, MAX_EXAMPLES, TITLE_COLUMNS, csv_line};
pub use normalize::normalize_title;
pub use policy::{BundleRead, TenantPolicy};
// The store keeps what the classifier proposes as it proposes it.
pub use crate::store::Candidate;

use calibrate::Calibrator;
use features::{FeatureConfig, FeatureSpace, RawFeature, SparseVec};
use model::{Rng, Softmax, TrainConfig};

/// The classifier's own revision, part of every tenant's policy fingerprint. Bump it with
/// any change to normalization, features, training or calibration that can change a
/// decision: a daemon started on a store classified by an older rosterd then reclassifies
/// the tenant (writing events only where the decision changed), instead of keeping old
/// answers beside new ones until the next reconcile.
pub const REVISION: &str = "2026-12-04.1";

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("{path}: cannot read bundle: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: invalid bundle TOML: {message}")]
    Parse { origin: String, message: String },
    #[error(
        "{origin}: invalid `{key}`{}: {reason}",
        // Escaped: an id refused for a line break or a direction override would
        // otherwise split or reorder the very message that refuses it.
        archetype.as_ref().map(|a| format!(" in archetype `{}`", a.escape_debug())).unwrap_or_default()
    )]
    Invalid {
        origin: String,
        /// The offending key, e.g. `default_archetype` or `id`.
        key: String,
        /// The archetype the key belongs to, when there is one.
        archetype: Option<String>,
        reason: String,
    },
    #[error("{origin}: line {line}: {message}")]
    Csv {
        origin: String,
        line: u64,
        message: String,
    },
    /// A tenant's group rule (in the daemon's config) names an archetype its bundle
    /// lacks: the config or the bundle is to fix, and the message names both.
    #[error(
        "group_rules[{index}] (group {group:?}) names archetype {archetype:?}, which is not in the tenant's bundle (version {bundle_version}); fix the rule in the config file or add the archetype to the bundle"
    )]
    UnknownRuleArchetype {
        index: usize,
        group: String,
        archetype: String,
        bundle_version: String,
    },
    /// Training did not finish (it panicked, or the runtime shut down under it).
    #[error("training the classifier stopped: {0}")]
    Interrupted(String),
    #[error("cannot serialize bundle: {0}")]
    Serialize(String),
}

/// The pick stays first; the runners-up are ordered by the confidence shown, as a
/// reviewer reads them top-down.
pub fn order_runners_up<T>(candidates: &mut [T], confidence: impl Fn(&T) -> f64) {
    if let Some(rest) = candidates.get_mut(1..) {
        rest.sort_by(|a, b| confidence(b).total_cmp(&confidence(a)));
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// `None` only when the title carries no usable evidence and the bundle
    /// has no `default_archetype`.
    pub archetype_id: Option<String>,
    /// Estimated probability that `archetype_id` is right.
    pub confidence: f64,
    /// Up to three archetypes, best first.
    pub candidates: Vec<Candidate>,
}

impl Classification {
    /// Whether the title or department held anything the bundle knows. Without it,
    /// `archetype_id` is only the bundle's default and there are no candidates.
    pub fn has_evidence(&self) -> bool {
        !self.candidates.is_empty()
    }
}

/// Logit bonus when the department equals one of an archetype's
/// department hints: a factor e^2 ≈ 7.4 in odds, enough to settle a title the
/// examples leave open ("Engineer", "Specialist") but not to overturn one they tie
/// to an archetype (in the demo bundle, "Analyst").
const HINT_EXACT_BONUS: f32 = 2.0;
/// Bonus when the hint's words are all in the department or vice versa.
const HINT_PARTIAL_BONUS: f32 = 1.0;
/// An exact example match is the bundle author's own answer; only
/// conflicting duplicates (the same title under two archetypes) lower it.
const EXACT_MATCH_CONFIDENCE: f64 = 0.99;
const MAX_FOLDS: usize = 5;
const TOP_K: usize = 3;

/// A trained classifier for one bundle version. Immutable after `new`, so it
/// can be shared across threads behind an `Arc`.
#[derive(Clone)]
pub struct Classifier {
    version: String,
    ids: Vec<String>,
    default_archetype: Option<String>,
    review_threshold: f64,
    feature_cfg: FeatureConfig,
    space: FeatureSpace,
    model: Softmax,
    calibrator: Calibrator,
    /// normalized example title -> (archetype index, count), sorted by index.
    exact: HashMap<String, Vec<(usize, u32)>>,
    /// normalized department hint -> archetype indices.
    hint_exact: HashMap<String, Vec<usize>>,
    /// (archetype index, hint tokens) for partial matches.
    hint_tokens: Vec<(usize, Vec<String>)>,
    /// token -> the `hint_tokens` holding it. A partial match shares a token with the
    /// department, so only those are compared: comparing every hint made a bundle of
    /// 100,000 hints classify 1,143 titles/s with a department.
    hint_by_token: HashMap<String, Vec<u32>>,
    /// token -> the `hint_tokens` whose rarest token (fewest hints share it) it is.
    hint_by_rarest: HashMap<String, Vec<u32>>,
}

/// Summary only: the weight matrix is megabytes and useless in a log line.
impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("version", &self.version)
            .field("archetypes", &self.ids.len())
            .field("features", &self.space.len())
            .field("default_archetype", &self.default_archetype)
            .field("review_threshold", &self.review_threshold)
            .finish_non_exhaustive()
    }
}

/// A training document: normalized text, label, and whether it is a real
/// example (only those are held out for calibration; keywords and titles
/// are always training-only hints).
struct Doc {
    norm: String,
    label: usize,
    held_out_ok: bool,
    raw: Vec<RawFeature>,
}

/// Out-of-fold outcome of one held-out example.
enum Outcome {
    Model { score: f64, correct: bool },
    Exact,
}

impl Classifier {
    pub fn new(bundle: &Bundle) -> Classifier {
        Classifier::with_config(bundle, FeatureConfig::default(), TrainConfig::default())
    }

    fn with_config(bundle: &Bundle, feature_cfg: FeatureConfig, train_cfg: TrainConfig) -> Self {
        // Archetypes by title, then id, and examples sorted (`collect_docs`): training, its
        // folds and tie-breaks then see one order, so reordering a bundle's file changes
        // nothing it decides. Not by id first: the order moves the fixed-seed shuffles,
        // and renaming one id (a key held elsewhere, not a thing the classifier learns)
        // moved other archetypes' confidences by up to 0.1, across the review threshold.
        let mut archetypes: Vec<&Archetype> = bundle.archetypes.iter().collect();
        archetypes.sort_by(|a, b| (&a.title, &a.id).cmp(&(&b.title, &b.id)));
        let ids: Vec<String> = archetypes.iter().map(|a| a.id.clone()).collect();
        let docs = collect_docs(&archetypes, &feature_cfg);

        let mut exact: HashMap<String, Vec<(usize, u32)>> = HashMap::new();
        for d in &docs {
            let entry = exact.entry(d.norm.clone()).or_default();
            match entry.iter_mut().find(|(a, _)| *a == d.label) {
                Some((_, c)) => *c += 1,
                None => entry.push((d.label, 1)),
            }
        }
        for v in exact.values_mut() {
            v.sort_unstable();
        }

        let mut hint_exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut hint_tokens: Vec<(usize, Vec<String>)> = Vec::new();
        for (i, a) in archetypes.iter().enumerate() {
            for h in &a.departments {
                let n = normalize_title(h);
                if n.is_empty() {
                    continue;
                }
                let e = hint_exact.entry(n.clone()).or_default();
                // The same hint twice for one archetype (as normalized: "Dept 7" and
                // "Dept 8" are both "dept") adds nothing but comparisons.
                if e.contains(&i) {
                    continue;
                }
                e.push(i);
                hint_tokens.push((i, n.split(' ').map(str::to_string).collect()));
            }
        }
        let mut hint_by_token: HashMap<String, Vec<u32>> = HashMap::new();
        for (h, (_, tokens)) in hint_tokens.iter().enumerate() {
            for t in tokens {
                let of = hint_by_token.entry(t.clone()).or_default();
                if of.last() != Some(&(h as u32)) {
                    of.push(h as u32);
                }
            }
        }
        // Each hint also under the one word of its that the fewest hints share: a hint
        // within the department holds that word too, and a word every hint has ("dept")
        // then does not make every department read every hint.
        let mut hint_by_rarest: HashMap<String, Vec<u32>> = HashMap::new();
        for (h, (_, tokens)) in hint_tokens.iter().enumerate() {
            if let Some(rarest) = tokens.iter().min_by_key(|t| (hint_by_token[*t].len(), *t)) {
                hint_by_rarest
                    .entry(rarest.clone())
                    .or_default()
                    .push(h as u32);
            }
        }

        let calibrator = calibrate(&docs, ids.len(), &feature_cfg, &train_cfg);
        let (space, model) = fit(&docs, None, ids.len(), &feature_cfg, &train_cfg);

        Classifier {
            version: bundle.version.clone(),
            ids,
            default_archetype: bundle.default_archetype.clone(),
            review_threshold: bundle.review_threshold,
            feature_cfg,
            space,
            model,
            calibrator,
            exact,
            hint_exact,
            hint_tokens,
            hint_by_token,
            hint_by_rarest,
        }
    }

    pub fn bundle_version(&self) -> &str {
        &self.version
    }

    /// The bundle's review threshold: callers should route assignments with
    /// a lower confidence to a person.
    pub fn review_threshold(&self) -> f64 {
        self.review_threshold
    }

    pub fn classify(&self, title: &str, department: Option<&str>) -> Classification {
        let norm = normalize_title(title);
        let dept_norm = department.map(normalize_title).filter(|d| !d.is_empty());

        let mut raw = Vec::with_capacity(64);
        features::extract(&norm, &self.feature_cfg, &mut raw);
        let mut x = SparseVec::with_capacity(raw.len());
        let known = self.space.vectorize(&raw, &mut x);

        let exact = self.exact.get(&norm).and_then(|v| majority(v));
        if known == 0 && exact.is_none() {
            return Classification {
                archetype_id: self.default_archetype.clone(),
                confidence: 0.0,
                candidates: Vec::new(),
            };
        }

        let mut probs = vec![0f32; self.model.n_classes()];
        self.model.logits(&x, &mut probs);
        // The department's hints are the bundle author's rule, not something the
        // examples measured, so they may choose among the archetypes the title allows
        // but not make the choice surer than the title alone makes that archetype:
        // calibration only knows titles.
        let title_only = dept_norm.as_ref().map(|d| {
            let mut alone = probs.clone();
            features::extract_dept(d, &mut raw);
            self.space.vectorize(&raw, &mut x);
            self.model.add_logits(&x, &mut probs);
            self.add_hint_bonus(d, &mut probs);
            model::softmax_in_place(&mut alone);
            TitleAlone::new(alone, &self.calibrator)
        });
        model::softmax_in_place(&mut probs);
        let ranked = top_k(&probs, self.ids.len());

        let (best, best_conf, best_p) = match exact {
            Some((idx, purity)) => (idx, EXACT_MATCH_CONFIDENCE * purity, probs[idx]),
            None => {
                // Among the archetypes the title allows: "Sr. Mfg. Director of EMEA" in
                // IT went to it_admin at 0.05, with production_planner at 0.72 below it.
                let allowed = |&&i: &&usize| title_only.as_ref().is_none_or(|t| t.allows(i));
                let chosen = ranked.iter().find(allowed);
                let Some(&best) = chosen.or(title_only.as_ref().map(|t| &t.top)) else {
                    return Classification {
                        archetype_id: self.default_archetype.clone(),
                        confidence: 0.0,
                        candidates: Vec::new(),
                    };
                };
                let p = probs[best];
                let mut conf = self.calibrator.apply(f64::from(p));
                if let Some(t) = &title_only {
                    conf = conf.min(t.rates(best));
                }
                (best, conf, p)
            }
        };

        let scale = runner_up_scale(best_p, best_conf);
        let mut candidates = Vec::with_capacity(TOP_K);
        candidates.push(Candidate {
            archetype_id: self.ids[best].clone(),
            confidence: round6(best_conf),
        });
        for &i in ranked.iter().filter(|&&i| i != best).take(TOP_K - 1) {
            let share = f64::from(probs[i]) * scale;
            let confidence = match &title_only {
                // The department chose: a runner-up the title alone rates higher shows
                // that rating (capped at its share), so a reviewer sees that the
                // department overruled the title, rather than a row of equal numbers.
                Some(t) if exact.is_none() => share.min(t.rates(i)),
                _ => share.min(best_conf),
            };
            candidates.push(Candidate {
                archetype_id: self.ids[i].clone(),
                confidence: round6(confidence),
            });
        }
        // The caps above can put a runner-up under the next one.
        order_runners_up(&mut candidates, |c| c.confidence);
        Classification {
            archetype_id: Some(self.ids[best].clone()),
            confidence: round6(best_conf),
            candidates,
        }
    }

    fn add_hint_bonus(&self, dept: &str, logits: &mut [f32]) {
        let mut bonus = vec![0f32; logits.len()];
        if let Some(list) = self.hint_exact.get(dept) {
            for &i in list {
                bonus[i] = HINT_EXACT_BONUS;
            }
        }
        let dept_tokens: Vec<&str> = dept.split(' ').collect();
        // A hint within the department holds its rarest token, which is then one of the
        // department's; a department within a hint is in the list of every one of the
        // department's tokens, so in the shortest of them. Either way it is a candidate.
        let within_hint = dept_tokens
            .iter()
            .map(|t| self.hint_by_token.get(*t).map_or(&[][..], Vec::as_slice))
            .min_by_key(|list| list.len())
            .unwrap_or_default();
        let mut candidates: Vec<u32> = dept_tokens
            .iter()
            .filter_map(|t| self.hint_by_rarest.get(*t))
            .flatten()
            .chain(within_hint)
            .copied()
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        for (i, hint) in candidates.iter().map(|&c| &self.hint_tokens[c as usize]) {
            let hint_in_dept = hint.iter().all(|h| dept_tokens.contains(&h.as_str()));
            let dept_in_hint = dept_tokens.iter().all(|d| hint.iter().any(|h| h == d));
            if hint_in_dept || dept_in_hint {
                bonus[*i] = bonus[*i].max(HINT_PARTIAL_BONUS);
            }
        }
        for (l, b) in logits.iter_mut().zip(&bonus) {
            *l += b;
        }
    }
}

/// What the title alone, without the department, says of each archetype, worked out
/// once per classification: its first choice and that choice's calibrated confidence.
struct TitleAlone {
    probs: Vec<f32>,
    top: usize,
    top_conf: f64,
}

impl TitleAlone {
    fn new(probs: Vec<f32>, calibrator: &Calibrator) -> TitleAlone {
        let top = top_k(&probs, 1).first().copied().unwrap_or(0);
        let top_conf = probs
            .get(top)
            .map_or(0.0, |&p| calibrator.apply(f64::from(p)));
        TitleAlone {
            probs,
            top,
            top_conf,
        }
    }

    /// Whether the department may choose archetype `i`: the title alone, as calibrated,
    /// rates it at most as much below its first choice as an exact department hint
    /// raises an archetype's odds (e^[`HINT_EXACT_BONUS`]). The department settles a
    /// title the examples leave open; it does not overturn one they tie elsewhere.
    fn allows(&self, i: usize) -> bool {
        self.rates(i) * f64::from(HINT_EXACT_BONUS.exp()) >= self.top_conf
    }

    /// The confidence the title alone gives archetype `i`, as its candidates list shows
    /// it: the calibrated confidence of its first choice, or a runner-up's share.
    fn rates(&self, i: usize) -> f64 {
        if i == self.top {
            return self.top_conf;
        }
        (f64::from(self.probs[i]) * runner_up_scale(self.probs[self.top], self.top_conf))
            .min(self.top_conf)
    }
}

/// Runners-up share the confidence the first choice leaves over, in proportion to the
/// model's probabilities, so the candidates never sum past 1.
fn runner_up_scale(best_p: f32, best_conf: f64) -> f64 {
    let rest = 1.0 - f64::from(best_p);
    if rest > 1e-9 {
        (1.0 - best_conf) / rest
    } else {
        0.0
    }
}

/// Rounding keeps serialized output short and stable across platforms whose
/// last-bit float behaviour might differ.
fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// The archetype holding a strict majority of an exact match, with its share.
fn majority(counts: &[(usize, u32)]) -> Option<(usize, f64)> {
    let total: u32 = counts.iter().map(|c| c.1).sum();
    let &(idx, c) = counts
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))?;
    let share = f64::from(c) / f64::from(total.max(1));
    (share > 0.5).then_some((idx, share))
}

/// Indices of the `k` largest values, ties broken by lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(TOP_K).min(values.len());
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        // Strictly greater: an equal later value never displaces an earlier one.
        let pos = best.partition_point(|&b| values[b] >= v);
        if pos < k {
            best.insert(pos, i);
            best.truncate(k);
        }
    }
    best
}

fn collect_docs(archetypes: &[&Archetype], cfg: &FeatureConfig) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut push = |text: &str, label: usize, held_out_ok: bool| {
        let norm = normalize_title(text);
        if norm.is_empty() {
            return;
        }
        let mut raw = Vec::new();
        features::extract(&norm, cfg, &mut raw);
        docs.push(Doc {
            norm,
            label,
            held_out_ok,
            raw,
        });
    };
    for (i, a) in archetypes.iter().enumerate() {
        for e in &a.examples {
            push(e, i, true);
        }
        for k in &a.keywords {
            push(k, i, false);
        }
        // A bare id ("811") as its own title teaches nothing.
        if a.title != a.id {
            push(&a.title, i, false);
        }
    }
    // Labels are already in title order; within one, the examples' order in the file is
    // no evidence.
    docs.sort_by(|a, b| (a.label, &a.norm, a.held_out_ok).cmp(&(b.label, &b.norm, b.held_out_ok)));
    docs
}

/// The most weights one model has (features × archetypes): 64 MB of `f32` while it
/// trains, two folds at a time. Training memory grew with features × archetypes without
/// a bound: a bundle of 20,000 archetypes asked for 8.7 GB for one fold. The SOC bundle
/// (5,913 examples, 90 archetypes) is well under it.
const MAX_WEIGHTS: usize = 16 << 20;

/// Trains the feature space and model on `docs`, skipping those whose index
/// is in `held_out` (a fold mask).
fn fit(
    docs: &[Doc],
    held_out: Option<&[bool]>,
    n_classes: usize,
    feature_cfg: &FeatureConfig,
    train_cfg: &TrainConfig,
) -> (FeatureSpace, Softmax) {
    let keep = |i: usize| held_out.is_none_or(|h| !h[i]);
    let train: Vec<&Doc> = docs
        .iter()
        .enumerate()
        .filter(|&(i, _)| keep(i))
        .map(|(_, d)| d)
        .collect();
    let space = FeatureSpace::build(
        train.iter().map(|d| d.raw.as_slice()),
        feature_cfg,
        MAX_WEIGHTS / n_classes.max(1),
    );
    let mut xs = Vec::with_capacity(train.len());
    let mut ys = Vec::with_capacity(train.len());
    for d in &train {
        let mut x = SparseVec::new();
        space.vectorize(&d.raw, &mut x);
        xs.push(x);
        ys.push(d.label);
    }
    let model = Softmax::train(&xs, &ys, space.len(), n_classes, train_cfg);
    (space, model)
}

/// Stratified fold assignment: examples of each archetype are shuffled with
/// a fixed seed and dealt round-robin, so every fold sees every archetype.
fn assign_folds(docs: &[Doc], n_classes: usize, k: usize) -> Vec<Option<usize>> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, d) in docs.iter().enumerate() {
        if d.held_out_ok {
            by_class[d.label].push(i);
        }
    }
    let mut rng = Rng::new(0x00f0_1d5e_ed00_0042);
    let mut fold = vec![None; docs.len()];
    let mut next = 0usize;
    for members in &mut by_class {
        rng.shuffle(members);
        for &i in members.iter() {
            fold[i] = Some(next % k);
            next += 1;
        }
    }
    fold
}

fn calibrate(
    docs: &[Doc],
    n_classes: usize,
    feature_cfg: &FeatureConfig,
    train_cfg: &TrainConfig,
) -> Calibrator {
    let n_real = docs.iter().filter(|d| d.held_out_ok).count();
    let k = MAX_FOLDS.min(n_real / 2);
    if k < 2 || n_classes < 2 {
        return Calibrator::fit(&[], n_classes);
    }
    let folds = assign_folds(docs, n_classes, k);
    let run_fold = |f: usize| -> Vec<Outcome> {
        let mask: Vec<bool> = folds.iter().map(|&x| x == Some(f)).collect();
        let (space, model) = fit(docs, Some(&mask), n_classes, feature_cfg, train_cfg);
        let mut exact: HashMap<&str, Vec<(usize, u32)>> = HashMap::new();
        for (d, _) in docs.iter().zip(&mask).filter(|(_, m)| !**m) {
            let e = exact.entry(d.norm.as_str()).or_default();
            match e.iter_mut().find(|(a, _)| *a == d.label) {
                Some((_, c)) => *c += 1,
                None => e.push((d.label, 1)),
            }
        }
        let mut out = Vec::new();
        let mut x = SparseVec::new();
        let mut probs = vec![0f32; n_classes];
        for (d, _) in docs.iter().zip(&mask).filter(|(_, m)| **m) {
            // Titles the exact-match path would answer are not the model's
            // to calibrate.
            if exact
                .get(d.norm.as_str())
                .and_then(|v| majority(v))
                .is_some()
            {
                out.push(Outcome::Exact);
                continue;
            }
            if space.vectorize(&d.raw, &mut x) == 0 {
                continue;
            }
            model.logits(&x, &mut probs);
            model::softmax_in_place(&mut probs);
            let best = top_k(&probs, 1).first().copied().unwrap_or(0);
            out.push(Outcome::Model {
                score: f64::from(probs[best]),
                correct: best == d.label,
            });
        }
        out
    };
    let outcomes = run_parallel(k, &run_fold);
    let samples: Vec<(f64, bool)> = outcomes
        .iter()
        .flatten()
        .filter_map(|o| match o {
            Outcome::Model { score, correct } => Some((*score, *correct)),
            Outcome::Exact => None,
        })
        .collect();
    Calibrator::fit(&samples, n_classes)
}

/// Runs `f(0..n)` on up to `available_parallelism` scoped threads and
/// returns the results in index order, so the outcome is the same however
/// many threads ran.
fn run_parallel<T: Send>(n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, n.max(1));
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| (i, f(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            // A panicking fold would already have aborted training logic;
            // its slot simply stays empty and is recomputed below.
            if let Ok(done) = h.join() {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            }
        }
    });
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| f(i)))
        .collect()
}

#[cfg(test)]
mod tests;
