//! Aggregation of model updates, streamed (docs/ARCHITECTURE.md, "Federated learning in a
//! tree").
//!
//! An update is a whole model (the round's starting model after local training). Every
//! rule here commutes with a shift, so aggregating models equals adding the aggregated
//! deltas to the start. Work is done one chunk of elements at a time: one pass per update
//! for its norm, one pass over all accepted updates for the aggregate, and, under the
//! robust rules, one more for each update's distance to the aggregate. At most
//! `K x chunk` values are held at once, whatever the model's size.
//!
//! Updates are claims of strangers. A file that does not parse, whose layout differs from
//! the round's model or that holds a non-finite value is rejected under every rule; its
//! weight (a claimed example count) must be positive and finite, and the caller bounds it.
//! Under `TrimmedMean` and `Median` an update whose norm is more than `outlier_cutoff`
//! times the round's median norm (or less than its `1 / outlier_cutoff`), or whose
//! distance to the robust aggregate is more than `outlier_cutoff` times the median
//! distance, is rejected too, and the aggregate is computed again without it.

use crate::model::{Layout, ModelError, ModelReader, ModelWriter, file_sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How updates are combined, coordinate by coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Weighted mean (FedAvg: weights are example counts).
    Mean,
    /// Mean of what is left after dropping `trim` of the values at each end (unweighted).
    TrimmedMean {
        /// Fraction dropped at each end, in [0, 0.5).
        trim: f64,
    },
    /// Median (unweighted; the mean of the middle two for an even count).
    Median,
}

impl Rule {
    fn robust(self) -> bool {
        !matches!(self, Rule::Mean)
    }
}

/// One update to aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// A local copy of the update's file.
    pub path: PathBuf,
    /// Its weight under `Mean` (the examples it was trained on, bounded by the caller).
    pub weight: f64,
}

/// Aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// The rule.
    pub rule: Rule,
    /// Elements read from each model at a time.
    pub chunk: usize,
    /// Under the robust rules: an update whose norm is more than this many times the
    /// round's median norm, or less than the median divided by it, or whose distance to
    /// the robust aggregate is more than this many times the median distance, is an
    /// outlier. Greater than 1.
    pub outlier_cutoff: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rule: Rule::Mean,
            chunk: 1 << 16,
            outlier_cutoff: 3.0,
        }
    }
}

/// Why an update was left out.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// The file is not a usable model.
    Unreadable(String),
    /// Its tensors differ from the round's model.
    Layout,
    /// It holds NaN or an infinity.
    NotFinite,
    /// Its weight is not a positive finite number.
    Weight,
    /// Its norm is far below the round's median: it barely moved the model (too little
    /// data or a free rider; not held against the node, which may be honest and small).
    Small {
        /// Its norm.
        norm: f64,
        /// The round's median norm.
        median: f64,
    },
    /// Its norm (distance to the round's model) is far above the round's median.
    Norm {
        /// Its norm.
        norm: f64,
        /// The round's median norm.
        median: f64,
    },
    /// Its distance to the robust aggregate is an outlier.
    Distance {
        /// Its distance.
        distance: f64,
        /// The round's median distance.
        median: f64,
    },
}

impl Rejection {
    /// Whether this counts against the node's trust: a statistical outlier or a broken
    /// file is the node's doing (an unreadable download may be the store's, and is not).
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(self, Rejection::Unreadable(_) | Rejection::Small { .. })
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Unreadable(e) => write!(f, "unreadable: {e}"),
            Rejection::Layout => write!(f, "its tensors differ from the round's model"),
            Rejection::NotFinite => write!(f, "it holds NaN or infinite values"),
            Rejection::Weight => write!(f, "its weight is not a positive number"),
            Rejection::Small { norm, median } => {
                write!(
                    f,
                    "its norm {norm:.4} is far below the round's (median {median:.4})"
                )
            }
            Rejection::Norm { norm, median } => {
                write!(f, "its norm {norm:.4} is an outlier (median {median:.4})")
            }
            Rejection::Distance { distance, median } => write!(
                f,
                "its distance {distance:.4} to the aggregate is an outlier (median {median:.4})"
            ),
        }
    }
}

/// What an aggregation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Indices (into the updates) that went into the aggregate.
    pub accepted: Vec<usize>,
    /// Indices left out, and why.
    pub rejected: Vec<(usize, Rejection)>,
    /// Each update's norm (distance to the round's model); NaN where unreadable.
    pub norms: Vec<f64>,
    /// Sum of the accepted weights.
    pub weight: f64,
    /// sha256 of the written aggregate.
    pub sha256: String,
    /// Elements per model.
    pub elements: usize,
}

/// Why no aggregate was written.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum AggregateError {
    /// The round's model is unusable.
    #[error("the round's model: {0}")]
    Base(ModelError),
    /// Writing the aggregate failed.
    #[error("writing the aggregate: {0}")]
    Output(ModelError),
    /// Every update was rejected (or there were none).
    #[error("no update could be accepted ({} rejected)", .0.len())]
    NoUpdates(Vec<(usize, Rejection)>),
    /// Settings out of range.
    #[error("{0}")]
    Options(String),
}

/// Median of `v` (sorted in place); NaN for an empty slice.
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Indices of `values` more than `cutoff` times their median (`upper_only`: else also
/// below the median divided by `cutoff`), with that median. Needs three values to judge.
///
/// A ratio, not a z-score of the median absolute deviation: honest updates from nodes
/// with different data (non-IID) differ by a factor of two and more, and a handful of
/// them gives a deviation too noisy to judge by; a poisoned update that matters is off by
/// far more.
fn outliers(values: &[(usize, f64)], cutoff: f64, upper_only: bool) -> (Vec<usize>, f64) {
    if values.len() < 3 {
        return (Vec::new(), f64::NAN);
    }
    let mut v: Vec<f64> = values.iter().map(|(_, x)| *x).collect();
    let m = median(&mut v);
    let scale = m.abs().max(1e-12);
    let out = values
        .iter()
        .filter(|(_, x)| *x > cutoff * scale || (!upper_only && *x < scale / cutoff))
        .map(|(i, _)| *i)
        .collect();
    (out, m)
}

/// Streams `||update - reference||` and whether every value is finite.
fn distance(
    update: &mut ModelReader,
    reference: &mut ModelReader,
    chunk: usize,
) -> Result<(f64, bool), ModelError> {
    let n = reference.layout.elements();
    let mut a = vec![0f32; chunk.min(n).max(1)];
    let mut b = a.clone();
    let (mut sum, mut finite) = (0f64, true);
    let mut at = 0;
    while at < n {
        let len = chunk.min(n - at);
        update.read(at, &mut a[..len])?;
        reference.read(at, &mut b[..len])?;
        for (x, y) in a[..len].iter().zip(&b[..len]) {
            finite &= x.is_finite();
            let d = (*x as f64) - (*y as f64);
            sum += d * d;
        }
        at += len;
    }
    Ok((sum.sqrt(), finite))
}

/// Combines one coordinate's values under `rule`; `scratch` is reused.
fn combine(rule: Rule, values: &[f32], weights: &[f64], total: f64, scratch: &mut Vec<f32>) -> f32 {
    match rule {
        Rule::Mean => {
            let s: f64 = values.iter().zip(weights).map(|(v, w)| *v as f64 * w).sum();
            (s / total) as f32
        }
        Rule::TrimmedMean { trim } => {
            scratch.clear();
            scratch.extend_from_slice(values);
            scratch.sort_by(f32::total_cmp);
            let k = values.len();
            let t = ((trim * k as f64).floor() as usize).min((k - 1) / 2);
            let kept = &scratch[t..k - t];
            (kept.iter().map(|v| *v as f64).sum::<f64>() / kept.len() as f64) as f32
        }
        Rule::Median => {
            scratch.clear();
            scratch.extend_from_slice(values);
            scratch.sort_by(f32::total_cmp);
            let k = scratch.len();
            if k % 2 == 1 {
                scratch[k / 2]
            } else {
                ((scratch[k / 2 - 1] as f64 + scratch[k / 2] as f64) / 2.0) as f32
            }
        }
    }
}

/// One pass: the aggregate of `chosen` updates written to `out`.
fn write_aggregate(
    layout: &Layout,
    updates: &[Update],
    chosen: &[usize],
    opts: &Options,
    out: &Path,
    metadata: &HashMap<String, String>,
) -> Result<(), AggregateError> {
    let mut readers = chosen
        .iter()
        .map(|i| ModelReader::open(&updates[*i].path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(AggregateError::Output)?;
    let weights: Vec<f64> = chosen.iter().map(|i| updates[*i].weight).collect();
    let total: f64 = weights.iter().sum();
    let n = layout.elements();
    let chunk = opts.chunk.min(n).max(1);
    let mut bufs = vec![vec![0f32; chunk]; readers.len()];
    let mut values = vec![0f32; readers.len()];
    let mut scratch = Vec::with_capacity(readers.len());
    let mut result = vec![0f32; chunk];
    let mut w =
        ModelWriter::create(out, layout, metadata.clone()).map_err(AggregateError::Output)?;
    let mut at = 0;
    while at < n {
        let len = chunk.min(n - at);
        for (r, b) in readers.iter_mut().zip(&mut bufs) {
            r.read(at, &mut b[..len]).map_err(AggregateError::Output)?;
        }
        for (j, slot) in result[..len].iter_mut().enumerate() {
            for (v, b) in values.iter_mut().zip(&bufs) {
                *v = b[j];
            }
            *slot = combine(opts.rule, &values, &weights, total, &mut scratch);
        }
        w.write(&result[..len]).map_err(AggregateError::Output)?;
        at += len;
    }
    w.finish().map_err(AggregateError::Output)
}

/// Aggregates `updates` of the round whose starting model is `base` into `out`.
pub fn aggregate(
    base: &Path,
    updates: &[Update],
    opts: &Options,
    out: &Path,
    metadata: HashMap<String, String>,
) -> Result<Outcome, AggregateError> {
    if let Rule::TrimmedMean { trim } = opts.rule
        && !(0.0..0.5).contains(&trim)
    {
        return Err(AggregateError::Options(format!(
            "trim {trim} is not in [0, 0.5)"
        )));
    }
    if opts.outlier_cutoff.is_nan() || opts.outlier_cutoff <= 1.0 {
        return Err(AggregateError::Options(format!(
            "outlier cutoff {} is not greater than 1",
            opts.outlier_cutoff
        )));
    }
    if opts.chunk == 0 {
        return Err(AggregateError::Options("chunk must be at least 1".into()));
    }
    let mut base_reader = ModelReader::open(base).map_err(AggregateError::Base)?;
    let layout = base_reader.layout.clone();
    let mut rejected = Vec::new();
    let mut norms = vec![f64::NAN; updates.len()];
    let mut candidates = Vec::new();
    for (i, u) in updates.iter().enumerate() {
        if !(u.weight.is_finite() && u.weight > 0.0) {
            rejected.push((i, Rejection::Weight));
            continue;
        }
        let mut r = match ModelReader::open(&u.path) {
            Ok(r) => r,
            Err(e @ ModelError::Io(_)) => {
                rejected.push((i, Rejection::Unreadable(e.to_string())));
                continue;
            }
            // A file that downloaded but does not parse is the writer's doing.
            Err(_) => {
                rejected.push((i, Rejection::Layout));
                continue;
            }
        };
        if r.layout != layout {
            rejected.push((i, Rejection::Layout));
            continue;
        }
        match distance(&mut r, &mut base_reader, opts.chunk) {
            Ok((norm, true)) => {
                norms[i] = norm;
                candidates.push((i, norm));
            }
            Ok((norm, false)) => {
                norms[i] = norm;
                rejected.push((i, Rejection::NotFinite));
            }
            Err(e) => rejected.push((i, Rejection::Unreadable(e.to_string()))),
        }
    }
    if opts.rule.robust() {
        let (out_norms, m) = outliers(&candidates, opts.outlier_cutoff, false);
        for i in &out_norms {
            let (norm, median) = (norms[*i], m);
            rejected.push((
                *i,
                if norm < median {
                    Rejection::Small { norm, median }
                } else {
                    Rejection::Norm { norm, median }
                },
            ));
        }
        candidates.retain(|(i, _)| !out_norms.contains(i));
    }
    let mut chosen: Vec<usize> = candidates.iter().map(|(i, _)| *i).collect();
    if chosen.is_empty() {
        rejected.sort_by_key(|(i, _)| *i);
        return Err(AggregateError::NoUpdates(rejected));
    }
    write_aggregate(&layout, updates, &chosen, opts, out, &metadata)?;
    if opts.rule.robust() && chosen.len() >= 3 {
        let mut agg = ModelReader::open(out).map_err(AggregateError::Output)?;
        let mut distances = Vec::with_capacity(chosen.len());
        for i in &chosen {
            let mut r = ModelReader::open(&updates[*i].path).map_err(AggregateError::Output)?;
            let (d, _) = distance(&mut r, &mut agg, opts.chunk).map_err(AggregateError::Output)?;
            distances.push((*i, d));
        }
        let (far, m) = outliers(&distances, opts.outlier_cutoff, true);
        if !far.is_empty() {
            for (i, d) in &distances {
                if far.contains(i) {
                    rejected.push((
                        *i,
                        Rejection::Distance {
                            distance: *d,
                            median: m,
                        },
                    ));
                }
            }
            chosen.retain(|i| !far.contains(i));
            write_aggregate(&layout, updates, &chosen, opts, out, &metadata)?;
        }
    }
    rejected.sort_by_key(|(i, _)| *i);
    Ok(Outcome {
        weight: chosen.iter().map(|i| updates[*i].weight).sum(),
        accepted: chosen,
        rejected,
        norms,
        sha256: file_sha256(out).map_err(AggregateError::Output)?,
        elements: layout.elements(),
    })
}

/// The hub's server step (FedAvgM, Hsu et al. 2019): with `delta = base - aggregate`,
/// `momentum' = beta * momentum + delta` and `model' = base - lr * momentum'`. With
/// `lr = 1` and `beta = 0` the new model is the aggregate. Streams like [`aggregate`];
/// `momentum` is the previous step's buffer (none at the first step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerStep {
    /// Server learning rate.
    pub lr: f64,
    /// Server momentum.
    pub beta: f64,
}

impl ServerStep {
    /// Whether this step leaves the aggregate as it is.
    pub fn is_plain(&self) -> bool {
        self.lr == 1.0 && self.beta == 0.0
    }

    /// Writes the next model to `out_model` and the new momentum to `out_momentum`.
    pub fn apply(
        &self,
        base: &Path,
        aggregate: &Path,
        momentum: Option<&Path>,
        out_model: &Path,
        out_momentum: &Path,
        chunk: usize,
    ) -> Result<String, AggregateError> {
        let mut b = ModelReader::open(base).map_err(AggregateError::Base)?;
        let mut a = ModelReader::open(aggregate).map_err(AggregateError::Output)?;
        let mut m = momentum
            .map(ModelReader::open)
            .transpose()
            .map_err(AggregateError::Output)?;
        let layout = b.layout.clone();
        if a.layout != layout || m.as_ref().is_some_and(|m| m.layout != layout) {
            return Err(AggregateError::Output(ModelError::Format(
                "the aggregate, momentum and model differ in layout".into(),
            )));
        }
        let n = layout.elements();
        let chunk = chunk.min(n).max(1);
        let (mut vb, mut va, mut vm) = (vec![0f32; chunk], vec![0f32; chunk], vec![0f32; chunk]);
        let mut wm = ModelWriter::create(out_model, &layout, HashMap::new())
            .map_err(AggregateError::Output)?;
        let mut wv = ModelWriter::create(out_momentum, &layout, HashMap::new())
            .map_err(AggregateError::Output)?;
        let mut at = 0;
        while at < n {
            let len = chunk.min(n - at);
            b.read(at, &mut vb[..len]).map_err(AggregateError::Base)?;
            a.read(at, &mut va[..len]).map_err(AggregateError::Output)?;
            match &mut m {
                Some(m) => m.read(at, &mut vm[..len]).map_err(AggregateError::Output)?,
                None => vm[..len].fill(0.0),
            }
            for j in 0..len {
                let delta = vb[j] as f64 - va[j] as f64;
                let mom = self.beta * vm[j] as f64 + delta;
                vm[j] = mom as f32;
                va[j] = (vb[j] as f64 - self.lr * mom) as f32;
            }
            wm.write(&va[..len]).map_err(AggregateError::Output)?;
            wv.write(&vm[..len]).map_err(AggregateError::Output)?;
            at += len;
        }
        wm.finish().map_err(AggregateError::Output)?;
        wv.finish().map_err(AggregateError::Output)?;
        file_sha256(out_model).map_err(AggregateError::Output)
    }
}
