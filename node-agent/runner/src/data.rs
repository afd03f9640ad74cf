//! Datasets: the shipped 8x8 digits, seeded synthetic blobs, and node-local CSV files.
//! Each yields features (row-major f32) and integer labels; a fixed seeded split gives
//! 80% train and 20% test, and shard i of n takes every n-th training row.

use std::io::Read;

/// The shipped digits (see data/README.md).
static DIGITS_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Features and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major features, `rows * features` values.
    pub x: Vec<f32>,
    /// One label per row.
    pub y: Vec<i64>,
    /// Features per row.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
}

/// Errors reading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    /// A row is malformed.
    #[error("{0}: line {1}: {2}")]
    Malformed(String, usize, String),
    /// Nothing to learn from.
    #[error("{0}: no rows")]
    Empty(String),
}

impl Dataset {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Parses CSV text: numeric features, then an integer label, per line.
    pub fn from_csv(name: &str, text: &str, scale: f32) -> Result<Dataset, DataError> {
        let mut x = Vec::new();
        let mut y = Vec::new();
        let mut features = None;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let values: Vec<&str> = line.split(',').map(str::trim).collect();
            let (label, row) = values
                .split_last()
                .ok_or_else(|| DataError::Malformed(name.into(), i + 1, "empty".into()))?;
            if *features.get_or_insert(row.len()) != row.len() || row.is_empty() {
                return Err(DataError::Malformed(
                    name.into(),
                    i + 1,
                    format!("{} features, expected {:?}", row.len(), features),
                ));
            }
            for v in row {
                let f: f32 = v.parse().map_err(|_| {
                    DataError::Malformed(name.into(), i + 1, format!("not a number: {v:?}"))
                })?;
                x.push(f / scale);
            }
            let l: i64 = label.parse().map_err(|_| {
                DataError::Malformed(
                    name.into(),
                    i + 1,
                    format!("label not an integer: {label:?}"),
                )
            })?;
            if l < 0 {
                return Err(DataError::Malformed(
                    name.into(),
                    i + 1,
                    "negative label".into(),
                ));
            }
            y.push(l);
        }
        let features = features.ok_or_else(|| DataError::Empty(name.into()))?;
        let classes = y.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0);
        Ok(Dataset {
            x,
            y,
            features,
            classes,
        })
    }

    /// The shipped digits, pixels scaled to [0, 1].
    pub fn digits() -> Result<Dataset, DataError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(DIGITS_GZ)
            .read_to_string(&mut text)
            .map_err(|e| DataError::Io("digits.csv.gz".into(), e))?;
        let mut d = Dataset::from_csv("digits", &text, 16.0)?;
        d.classes = 10;
        Ok(d)
    }

    /// A node-local CSV file.
    pub fn file(path: &str) -> Result<Dataset, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::Io(path.into(), e))?;
        Dataset::from_csv(path, &text, 1.0)
    }

    /// Gaussian blobs: `classes` centres in [-3, 3]^features, unit noise; same seed, same data.
    pub fn synthetic(samples: usize, features: usize, classes: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15);
        let centres: Vec<f32> = (0..classes * features)
            .map(|_| (rng.unit() * 6.0 - 3.0) as f32)
            .collect();
        let mut x = Vec::with_capacity(samples * features);
        let mut y = Vec::with_capacity(samples);
        for i in 0..samples {
            let c = i % classes;
            for f in 0..features {
                x.push(centres[c * features + f] + rng.normal() as f32);
            }
            y.push(c as i64);
        }
        Dataset {
            x,
            y,
            features,
            classes,
        }
    }

    /// The rows at `idx`.
    pub fn select(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * self.features);
        for &i in idx {
            x.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
        }
        Dataset {
            x,
            y: idx.iter().map(|&i| self.y[i]).collect(),
            features: self.features,
            classes: self.classes,
        }
    }

    /// (train, test): a seeded permutation, 80/20; the train part restricted to `shard` of
    /// `shards` (every `shards`-th row).
    pub fn split(&self, seed: u64, shard: u32, shards: u32) -> (Dataset, Dataset) {
        let mut idx: Vec<usize> = (0..self.rows()).collect();
        let mut rng = Rng::new(seed);
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let cut = self.rows() * 4 / 5;
        let train: Vec<usize> = idx[..cut]
            .iter()
            .enumerate()
            .filter(|(k, _)| *k as u32 % shards.max(1) == shard)
            .map(|(_, i)| *i)
            .collect();
        (self.select(&train), self.select(&idx[cut..]))
    }
}

/// xorshift64* with Box-Muller normals: small, seeded, identical everywhere.
pub struct Rng(u64);

impl Rng {
    /// A generator; seed 0 is remapped.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_1797_rows_of_64_pixels_in_10_classes() {
        let d = Dataset::digits().expect("digits");
        assert_eq!((d.rows(), d.features, d.classes), (1797, 64, 10));
        assert!(d.x.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!((0..10).all(|c| d.y.contains(&c)));
    }

    #[test]
    fn shards_partition_the_training_rows_and_share_the_test_rows() {
        let d = Dataset::digits().expect("digits");
        let (all, test) = d.split(7, 0, 1);
        let parts: Vec<(Dataset, Dataset)> = (0..3).map(|s| d.split(7, s, 3)).collect();
        assert_eq!(
            parts.iter().map(|(t, _)| t.rows()).sum::<usize>(),
            all.rows()
        );
        assert!(parts.iter().all(|(_, t)| *t == test));
        assert_eq!(all.rows() + test.rows(), 1797);
    }

    #[test]
    fn malformed_csv_names_the_line() {
        let err = Dataset::from_csv("f.csv", "1,2,0\n3,x,1\n", 1.0).expect_err("bad");
        assert_eq!(err.to_string(), "f.csv: line 2: not a number: \"x\"");
        assert!(Dataset::from_csv("f.csv", "1,2,0\n3,1\n", 1.0).is_err());
    }

    #[test]
    fn synthetic_data_is_reproducible() {
        assert_eq!(
            Dataset::synthetic(50, 4, 3, 9),
            Dataset::synthetic(50, 4, 3, 9)
        );
        assert_ne!(
            Dataset::synthetic(50, 4, 3, 9),
            Dataset::synthetic(50, 4, 3, 10)
        );
    }
}
