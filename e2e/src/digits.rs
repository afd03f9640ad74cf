//! The shipped 8x8 digits as node-local datasets: label-skewed (non-IID) slices for
//! federated learning, and the shared test rows that no node holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Agents' node-local datasets, by node: dataset name -> CSV path.
pub type Datasets = BTreeMap<String, BTreeMap<String, PathBuf>>;

/// The node-local dataset name the slices are declared under.
pub const DATASET: &str = "digits-slice";

/// The digits as CSV rows (pixels scaled to [0, 1], then the label), with their labels.
pub fn rows() -> Vec<(String, u32)> {
    use std::io::Read as _;
    let gz = std::fs::read(crate::torch_models::digits_csv()).unwrap_or_default();
    let mut raw = String::new();
    let _ = flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut raw);
    raw.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            let v: Vec<&str> = line.split(',').collect();
            let (label, px) = v.split_last()?;
            let scaled: Vec<String> = px
                .iter()
                .map(|p| format!("{}", p.parse::<f32>().unwrap_or(0.0) / 16.0))
                .collect();
            Some((
                format!("{},{label}", scaled.join(",")),
                label.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// Gives every node of `nodes` its own label-skewed slice of the digits as the
/// node-local dataset [`DATASET`] (every row of its own labels, those with
/// `label % nodes == i`, and a fifth of the others); every fifth row is the shared test
/// set, held by no node. Writes the CSVs into `dir`; returns the agents' datasets by node
/// and the test CSV.
pub fn label_skewed_slices(dir: &Path, nodes: &[String]) -> std::io::Result<(Datasets, PathBuf)> {
    let rows = rows();
    let n = nodes.len().max(1);
    let mut data = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let mine: Vec<&str> = rows
            .iter()
            .enumerate()
            .filter(|(r, _)| r % 5 != 0)
            .filter(|(r, (_, label))| *label as usize % n == i || (r / 5) % 5 == i % 5)
            .map(|(_, (line, _))| line.as_str())
            .collect();
        let path = dir.join(format!("slice-{node}.csv"));
        std::fs::write(&path, mine.join("\n"))?;
        data.insert(node.clone(), BTreeMap::from([(DATASET.to_string(), path)]));
    }
    let test: Vec<&str> = rows
        .iter()
        .enumerate()
        .filter(|(r, _)| r % 5 == 0)
        .map(|(_, (line, _))| line.as_str())
        .collect();
    let path = dir.join("test.csv");
    std::fs::write(&path, test.join("\n"))?;
    Ok((data, path))
}
