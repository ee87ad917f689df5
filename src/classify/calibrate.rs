//! Maps the model's raw top-class probability to a confidence that means
//! what it says: the estimated accuracy of assignments with that score.
//!
//! Fitted at bundle load on out-of-fold predictions for the bundle's own
//! examples: isotonic regression (pool-adjacent-violators), blocks merged
//! to a minimum size, each block's accuracy replaced by its Wilson lower
//! bound, then made monotone by taking the running minimum from the top.
//! The lower bound and the fold models being trained on less data than the
//! final model both err on the conservative side.

/// One-sided z for the Wilson lower bound (95% confidence). At 84% (z = 1), bundles of
/// five examples an archetype promised more than they kept: of 180 small bundles drawn
/// from the SOC data, 13 were right less than 70% of the time at confidence >= 0.7;
/// with this and `MIN_BLOCK`, 1 (within noise), at a cost of 0.7 points of coverage
/// on the full SOC bundle (BENCHMARKS.md).
const WILSON_Z: f64 = 1.645;
/// The fewest held-out predictions one step of the mapping may rest on.
const MIN_BLOCK: usize = 20;
/// Below this many out-of-fold predictions the isotonic fit is too noisy.
const MIN_SAMPLES: usize = 20;
/// With too little data, confidence never exceeds this, so every
/// non-exact assignment of a tiny bundle stays below a 0.7 review threshold.
const FALLBACK_CAP: f64 = 0.6;

#[derive(Debug, Clone)]
pub(crate) enum Calibrator {
    /// Knots (raw score, confidence), strictly increasing in score and
    /// non-decreasing in confidence; linear in between.
    Isotonic { knots: Vec<(f64, f64)> },
    /// Too little held-out data: a fixed, deliberately timid mapping.
    Fallback { chance: f64 },
}

pub(crate) fn wilson_lower(correct: f64, n: f64, z: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    let p = correct / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - spread) / (1.0 + z2 / n)).clamp(0.0, 1.0)
}

struct Block {
    sum_score: f64,
    correct: f64,
    n: f64,
}

impl Block {
    fn rate(&self) -> f64 {
        self.correct / self.n
    }
    fn absorb(&mut self, other: &Block) {
        self.sum_score += other.sum_score;
        self.correct += other.correct;
        self.n += other.n;
    }
}

impl Calibrator {
    /// `samples`: (raw score, was the top class right). `n_classes` sets the
    /// chance level used by the fallback.
    pub(crate) fn fit(samples: &[(f64, bool)], n_classes: usize) -> Calibrator {
        let chance = 1.0 / n_classes.max(1) as f64;
        if samples.len() < MIN_SAMPLES || n_classes < 2 {
            return Calibrator::Fallback { chance };
        }
        let mut sorted = samples.to_vec();
        // Ties broken by outcome so the fit does not depend on input order.
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

        let mut blocks: Vec<Block> = Vec::new();
        for &(s, ok) in &sorted {
            let mut b = Block {
                sum_score: s,
                correct: if ok { 1.0 } else { 0.0 },
                n: 1.0,
            };
            while let Some(last) = blocks.last() {
                if last.rate() >= b.rate() {
                    let last = blocks.pop();
                    if let Some(mut last) = last {
                        last.absorb(&b);
                        b = last;
                    }
                } else {
                    break;
                }
            }
            blocks.push(b);
        }

        // Merging neighbours of a monotone sequence keeps it monotone, and a
        // minimum size stops one lucky top block from setting the scale.
        let min_block = (samples.len() / 25).clamp(MIN_BLOCK, 60) as f64;
        let mut merged: Vec<Block> = Vec::new();
        for b in blocks {
            match merged.last_mut() {
                Some(last) if last.n < min_block => last.absorb(&b),
                _ => merged.push(b),
            }
        }
        if merged.len() > 1
            && merged.last().is_some_and(|b| b.n < min_block)
            && let Some(tail) = merged.pop()
            && let Some(prev) = merged.last_mut()
        {
            prev.absorb(&tail);
        }

        let mut knots: Vec<(f64, f64)> = merged
            .iter()
            .map(|b| (b.sum_score / b.n, wilson_lower(b.correct, b.n, WILSON_Z)))
            .collect();
        for i in (0..knots.len().saturating_sub(1)).rev() {
            knots[i].1 = knots[i].1.min(knots[i + 1].1);
        }
        knots.dedup_by(|next, kept| next.0 <= kept.0);
        // A top probability at chance level carries no information. Without
        // this anchor, titles less familiar than any held-out example (e.g.
        // gibberish) would inherit the lowest block's accuracy.
        if let Some(&(s0, c0)) = knots.first()
            && s0 > chance
        {
            knots.insert(0, (chance, c0.min(chance)));
        }
        Calibrator::Isotonic { knots }
    }

    pub(crate) fn apply(&self, score: f64) -> f64 {
        match self {
            Calibrator::Fallback { chance } => {
                if *chance >= 1.0 {
                    return FALLBACK_CAP;
                }
                ((score - chance) / (1.0 - chance)).clamp(0.0, 1.0) * FALLBACK_CAP
            }
            Calibrator::Isotonic { knots } => {
                let (Some(first), Some(last)) = (knots.first(), knots.last()) else {
                    return 0.0;
                };
                if score <= first.0 {
                    return first.1;
                }
                if score >= last.0 {
                    return last.1;
                }
                let i = knots.partition_point(|k| k.0 <= score);
                let (x0, y0) = knots[i - 1];
                let (x1, y1) = knots[i];
                y0 + (y1 - y0) * (score - x0) / (x1 - x0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_is_below_the_rate() {
        assert!(wilson_lower(10.0, 10.0, 1.0) < 1.0);
        assert!(wilson_lower(10.0, 10.0, 1.0) > 0.85);
        assert!(wilson_lower(5.0, 10.0, 1.0) < 0.5);
        assert_eq!(wilson_lower(0.0, 0.0, 1.0), 0.0);
    }

    #[test]
    fn isotonic_is_monotone_and_conservative() {
        // Accuracy rises with score: 20% at low scores, 95% at high.
        let mut samples = Vec::new();
        for i in 0..400 {
            let s = f64::from(i) / 400.0;
            let p_correct = 0.2 + 0.75 * s;
            let ok = (f64::from(i * 7919 % 400) / 400.0) < p_correct;
            samples.push((s, ok));
        }
        let c = Calibrator::fit(&samples, 10);
        let mut prev = 0.0;
        for i in 0..=100 {
            let v = c.apply(f64::from(i) / 100.0);
            assert!(v >= prev - 1e-12, "not monotone at {i}");
            prev = v;
        }
        // Conservative: never above the empirical accuracy of the top scores.
        let top: Vec<_> = samples.iter().filter(|s| s.0 >= 0.8).collect();
        let top_rate = top.iter().filter(|s| s.1).count() as f64 / top.len() as f64;
        assert!(c.apply(0.8) <= top_rate, "{} > {top_rate}", c.apply(0.8));
        assert!(c.apply(1.0) > 0.7 && c.apply(1.0) < 1.0);
        assert!(c.apply(0.0) < 0.4);
    }

    #[test]
    fn tiny_data_falls_back() {
        let c = Calibrator::fit(&[(0.9, true); 5], 4);
        assert!(matches!(c, Calibrator::Fallback { .. }));
        assert!(c.apply(1.0) <= FALLBACK_CAP);
        assert_eq!(c.apply(0.25), 0.0);
    }
}
