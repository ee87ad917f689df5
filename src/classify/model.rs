//! Multinomial logistic regression over sparse features, trained by SGD.
//!
//! SGD (rather than batch L-BFGS) because a few passes over ~6k short titles
//! converge well and cost a fraction of a second, which matters since the
//! model is trained 1 + k times (k cross-validation folds) at every bundle
//! load. Determinism comes from a fixed-seed shuffle and sequential updates.

use super::features::SparseVec;

#[derive(Debug, Clone)]
pub(crate) struct TrainConfig {
    pub epochs: usize,
    /// No explicit L2 penalty: with a fixed, small number of passes and a
    /// decaying step, the weights stay moderate (early stopping is the
    /// regularizer), cross-validation showed no gain from a penalty, and
    /// without one an update can skip every class whose gradient is ~0.
    pub learning_rate: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 15,
            learning_rate: 1.0,
            seed: 0x5eed_1234_abcd_0001,
        }
    }
}

/// Row-major weights: one row of `n_classes` per feature, so scoring a title
/// touches only the rows of its active features. Rows are stored as `i8`
/// with a per-row scale: scoring is bound by fetching rows from memory, and
/// a quarter of the bytes roughly doubles throughput while moving logits by
/// well under 0.01 (calibration is fitted on the quantized fold models, so
/// confidence accounts for it).
#[derive(Debug, Clone)]
pub(crate) struct Softmax {
    n_classes: usize,
    weights: Vec<i8>,
    row_scale: Vec<f32>,
    bias: Vec<f32>,
}

/// Full-precision weights used only while training.
struct Dense {
    n_classes: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    fn logits(&self, x: &SparseVec, out: &mut [f32]) {
        out.copy_from_slice(&self.bias);
        for &(f, v) in x {
            let row = &self.weights[f as usize * self.n_classes..][..self.n_classes];
            for (o, w) in out.iter_mut().zip(row) {
                *o += v * w;
            }
        }
    }

    fn quantize(self) -> Softmax {
        let n_rows = self.weights.len().checked_div(self.n_classes).unwrap_or(0);
        let mut weights = vec![0i8; self.weights.len()];
        let mut row_scale = vec![0f32; n_rows];
        for r in 0..n_rows {
            let row = &self.weights[r * self.n_classes..][..self.n_classes];
            let max = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            if max == 0.0 {
                continue;
            }
            let scale = max / 127.0;
            row_scale[r] = scale;
            for (q, w) in weights[r * self.n_classes..][..self.n_classes]
                .iter_mut()
                .zip(row)
            {
                *q = (w / scale).round().clamp(-127.0, 127.0) as i8;
            }
        }
        Softmax {
            n_classes: self.n_classes,
            weights,
            row_scale,
            bias: self.bias,
        }
    }
}

/// xorshift64*: tiny, seedable and identical on every platform.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

impl Softmax {
    pub(crate) fn train(
        xs: &[SparseVec],
        ys: &[usize],
        n_features: usize,
        n_classes: usize,
        cfg: &TrainConfig,
    ) -> Softmax {
        let mut model = Dense {
            n_classes,
            weights: vec![0.0; n_features * n_classes],
            bias: vec![0.0; n_classes],
        };
        if n_classes == 0 || xs.is_empty() {
            return model.quantize();
        }
        // Start from the class log-priors so early updates go to features,
        // not to re-learning how common each class is.
        let mut counts = vec![1.0f32; n_classes];
        for &y in ys {
            counts[y] += 1.0;
        }
        let total: f32 = counts.iter().sum();
        for (b, c) in model.bias.iter_mut().zip(&counts) {
            *b = (c / total).ln();
        }
        let mut order: Vec<usize> = (0..xs.len()).collect();
        let mut rng = Rng::new(cfg.seed);
        let mut grad = vec![0f32; n_classes];
        let mut step = 0usize;
        let mut active: Vec<usize> = Vec::with_capacity(n_classes);
        let total_steps = (cfg.epochs * xs.len()).max(1) as f32;
        for _ in 0..cfg.epochs {
            rng.shuffle(&mut order);
            for &i in &order {
                // Linear decay to a small floor: large steps early, fine
                // convergence at the end.
                let progress = step as f32 / total_steps;
                let lr = cfg.learning_rate * (1.0 - 0.9 * progress);
                step += 1;
                model.logits(&xs[i], &mut grad);
                softmax_in_place(&mut grad);
                grad[ys[i]] -= 1.0;
                // Once the model fits an example, most classes get a
                // negligible gradient; touching only the rest roughly halves
                // training time.
                active.clear();
                active.extend((0..n_classes).filter(|&c| grad[c].abs() > GRAD_EPS));
                for &(f, v) in &xs[i] {
                    let row = &mut model.weights[f as usize * n_classes..][..n_classes];
                    let s = lr * v;
                    for &c in &active {
                        row[c] -= s * grad[c];
                    }
                }
                for (b, g) in model.bias.iter_mut().zip(&grad) {
                    *b -= lr * 0.1 * g;
                }
            }
        }
        model.quantize()
    }

    pub(crate) fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// Writes the logits of `x` into `out` (length `n_classes`).
    pub(crate) fn logits(&self, x: &SparseVec, out: &mut [f32]) {
        out.copy_from_slice(&self.bias);
        self.add_logits(x, out);
    }

    /// Adds what the features of `x` contribute to the logits in `out`, without the
    /// bias: the model is linear, so the logits of two disjoint feature sets add up.
    pub(crate) fn add_logits(&self, x: &SparseVec, out: &mut [f32]) {
        for &(f, v) in x {
            let s = v * self.row_scale[f as usize];
            let row = &self.weights[f as usize * self.n_classes..][..self.n_classes];
            for (o, &w) in out.iter_mut().zip(row) {
                *o += s * f32::from(w);
            }
        }
    }
}

/// Gradients below this are skipped in the sparse update path.
const GRAD_EPS: f32 = 1e-3;

pub(crate) fn softmax_in_place(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    if sum > 0.0 {
        for x in v.iter_mut() {
            *x /= sum;
        }
    }
}
