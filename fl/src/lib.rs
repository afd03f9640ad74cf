//! edgeloom-fl: the arithmetic of federated learning, without libtorch
//! (docs/ARCHITECTURE.md, "Federated learning in a tree").
//!
//! Models travel as safetensors files of f32 tensors ([`model`]). A node's update is its
//! whole model after local training; [`aggregate::aggregate`] combines a round's updates
//! under a rule (weighted mean, trimmed mean, median), streaming a chunk of every update
//! at a time, and rejects updates that cannot be trusted. The same code aggregates a
//! member cluster's node updates (in the runner, on an edge node) and the member models
//! at the hub (in the operator), so both levels agree by construction.

pub mod aggregate;
pub mod model;

pub use aggregate::{
    AggregateError, Options, Outcome, Rejection, Rule, ServerStep, Update, aggregate,
};
pub use model::{Layout, ModelError, ModelReader, ModelWriter, Tensor};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{read_flat, write_model};
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    fn layout() -> Vec<Tensor> {
        vec![
            Tensor {
                name: "fc1.weight".into(),
                shape: vec![4, 3],
            },
            Tensor {
                name: "fc1.bias".into(),
                shape: vec![4],
            },
            Tensor {
                name: "fc2.weight".into(),
                shape: vec![2, 4],
            },
        ]
    }

    /// A deterministic pseudo-random vector.
    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * scale
            })
            .collect()
    }

    fn write(dir: &Path, name: &str, flat: &[f32]) -> PathBuf {
        let path = dir.join(name);
        crate::model::write_flat(&path, &Layout(layout()), flat, HashMap::new()).expect("written");
        path
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgeloom-fl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    const N: usize = 12 + 4 + 8;

    #[test]
    fn a_written_model_is_a_valid_safetensors_file_and_reads_back() {
        let d = dir("roundtrip");
        let v = values(1, N, 2.0);
        let p = write(&d, "m.safetensors", &v);
        let bytes = std::fs::read(&p).expect("read");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors parses it");
        assert_eq!(st.len(), 3);
        assert_eq!(st.tensor("fc1.bias").expect("bias").shape(), &[4]);
        let (l, back) = read_flat(&p).expect("read back");
        assert_eq!(l.0, layout());
        assert_eq!(back, v);
    }

    #[test]
    fn a_weighted_mean_is_fedavg_by_examples() {
        let d = dir("mean");
        let base = write(&d, "base", &values(0, N, 1.0));
        let a = values(1, N, 1.0);
        let b = values(2, N, 1.0);
        let ups = vec![
            Update {
                path: write(&d, "a", &a),
                weight: 30.0,
            },
            Update {
                path: write(&d, "b", &b),
                weight: 10.0,
            },
        ];
        let out = d.join("out");
        let o =
            aggregate(&base, &ups, &Options::default(), &out, HashMap::new()).expect("aggregated");
        assert_eq!(o.accepted, vec![0, 1]);
        assert_eq!(o.weight, 40.0);
        let (_, got) = read_flat(&out).expect("out");
        for j in 0..N {
            let want = (a[j] as f64 * 30.0 + b[j] as f64 * 10.0) / 40.0;
            assert!(
                (got[j] as f64 - want).abs() < 1e-6,
                "{j}: {} vs {want}",
                got[j]
            );
        }
        assert_eq!(o.sha256, crate::model::file_sha256(&out).expect("digest"));
    }

    /// The invariant of the tree: two-level example-weighted means (members, then the hub
    /// weighting each member model by its examples) equal flat FedAvg.
    #[test]
    fn a_tree_with_k_1_and_example_weighted_means_equals_flat_fedavg() {
        let d = dir("tree");
        let base = write(&d, "base", &values(0, N, 1.0));
        let opts = Options {
            chunk: 5,
            ..Options::default()
        };
        let mut all = Vec::new();
        let mut members = Vec::new();
        for c in 0..3 {
            let mut ups = Vec::new();
            for n in 0..4 {
                let i = c * 4 + n;
                let u = Update {
                    path: write(&d, &format!("u{i}"), &values(100 + i as u64, N, 3.0)),
                    weight: (7 + 13 * i % 50) as f64,
                };
                all.push(u.clone());
                ups.push(u);
            }
            let out = d.join(format!("member{c}"));
            let o = aggregate(&base, &ups, &opts, &out, HashMap::new()).expect("member");
            members.push(Update {
                path: out,
                weight: o.weight,
            });
        }
        let tree = d.join("tree");
        aggregate(&base, &members, &opts, &tree, HashMap::new()).expect("hub");
        let flat = d.join("flat");
        aggregate(&base, &all, &opts, &flat, HashMap::new()).expect("flat");
        let (_, t) = read_flat(&tree).expect("tree");
        let (_, f) = read_flat(&flat).expect("flat");
        let worst = t
            .iter()
            .zip(&f)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "tree and flat differ by {worst}");
    }

    #[test]
    fn the_chunk_size_does_not_change_the_aggregate() {
        let d = dir("chunks");
        let base = write(&d, "base", &values(0, N, 1.0));
        let ups: Vec<Update> = (0..5)
            .map(|i| Update {
                path: write(&d, &format!("u{i}"), &values(10 + i, N, 1.0)),
                weight: 1.0 + i as f64,
            })
            .collect();
        for rule in [Rule::Mean, Rule::TrimmedMean { trim: 0.2 }, Rule::Median] {
            let mut digests = Vec::new();
            for chunk in [1, 7, N, 1 << 20] {
                let out = d.join(format!("out-{chunk}"));
                let o = aggregate(
                    &base,
                    &ups,
                    &Options {
                        rule,
                        chunk,
                        ..Options::default()
                    },
                    &out,
                    HashMap::new(),
                )
                .expect("aggregated");
                digests.push(o.sha256);
            }
            assert!(
                digests.windows(2).all(|w| w[0] == w[1]),
                "{rule:?}: {digests:?}"
            );
        }
    }

    #[test]
    fn median_and_trimmed_mean_pick_the_middle() {
        let d = dir("robust");
        let base = write(&d, "base", &[0.0; N]);
        let ups: Vec<Update> = [1.0f32, 2.0, 3.0, 4.0, 100.0]
            .iter()
            .enumerate()
            .map(|(i, v)| Update {
                path: write(&d, &format!("u{i}"), &[*v; N]),
                weight: 1.0,
            })
            .collect();
        // Without outlier rejection: the rules alone.
        let opts = |rule| Options {
            rule,
            outlier_cutoff: f64::INFINITY,
            ..Options::default()
        };
        let out = d.join("median");
        aggregate(&base, &ups, &opts(Rule::Median), &out, HashMap::new()).expect("median");
        assert!(read_flat(&out).expect("m").1.iter().all(|v| *v == 3.0));
        aggregate(
            &base,
            &ups,
            &opts(Rule::TrimmedMean { trim: 0.2 }),
            &out,
            HashMap::new(),
        )
        .expect("trimmed");
        assert!(read_flat(&out).expect("t").1.iter().all(|v| *v == 3.0));
        aggregate(&base, &ups[..4], &opts(Rule::Median), &out, HashMap::new())
            .expect("even median");
        assert!(read_flat(&out).expect("e").1.iter().all(|v| *v == 2.5));
    }

    /// The attack: two of ten nodes send scaled or sign-flipped updates. Under
    /// TrimmedMean both are rejected (counted against them) and the aggregate stays with
    /// the honest ones; under Mean the scaled one drags the model far away.
    #[test]
    fn scaled_and_sign_flipped_updates_are_rejected_under_trimmed_mean() {
        let d = dir("poison");
        let start = values(0, N, 1.0);
        let base = write(&d, "base", &start);
        // Honest nodes move the model in one direction, with noise.
        let direction = values(7, N, 1.0);
        let honest = |i: u64| -> Vec<f32> {
            let noise = values(50 + i, N, 0.2);
            (0..N).map(|j| start[j] + direction[j] + noise[j]).collect()
        };
        let mut ups: Vec<Update> = (0..8)
            .map(|i| Update {
                path: write(&d, &format!("h{i}"), &honest(i)),
                weight: 10.0,
            })
            .collect();
        let scaled: Vec<f32> = (0..N).map(|j| start[j] + 50.0 * direction[j]).collect();
        let flipped: Vec<f32> = (0..N).map(|j| start[j] - direction[j]).collect();
        ups.push(Update {
            path: write(&d, "scaled", &scaled),
            weight: 10.0,
        });
        ups.push(Update {
            path: write(&d, "flipped", &flipped),
            weight: 10.0,
        });
        let out = d.join("out");
        let o = aggregate(
            &base,
            &ups,
            &Options {
                rule: Rule::TrimmedMean { trim: 0.2 },
                ..Options::default()
            },
            &out,
            HashMap::new(),
        )
        .expect("aggregated");
        let rejected: Vec<usize> = o.rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, vec![8, 9], "{:?}", o.rejected);
        assert!(o.rejected.iter().all(|(_, r)| r.is_misbehaviour()));
        assert_eq!(o.accepted, (0..8).collect::<Vec<_>>());
        let (_, got) = read_flat(&out).expect("out");
        let err: f32 = (0..N)
            .map(|j| (got[j] - start[j] - direction[j]).abs())
            .fold(0.0, f32::max);
        assert!(
            err < 0.2,
            "the aggregate strays {err} from the honest direction"
        );
        // Mean takes everything (it is not robust) and is dragged off.
        let m = aggregate(&base, &ups, &Options::default(), &out, HashMap::new()).expect("mean");
        assert!(m.rejected.is_empty());
        let (_, mean) = read_flat(&out).expect("mean out");
        let err: f32 = (0..N)
            .map(|j| (mean[j] - start[j] - direction[j]).abs())
            .fold(0.0, f32::max);
        assert!(err > 1.0, "a scaled update moves the plain mean ({err})");
    }

    #[test]
    fn broken_files_are_rejected_and_the_rest_aggregated() {
        let d = dir("broken");
        let base = write(&d, "base", &values(0, N, 1.0));
        let good = write(&d, "good", &values(1, N, 1.0));
        let garbage = d.join("garbage");
        std::fs::write(&garbage, b"\x10\0\0\0\0\0\0\0{not json at all").expect("w");
        let mut nan = values(2, N, 1.0);
        nan[3] = f32::NAN;
        let nan = write(&d, "nan", &nan);
        let other = d.join("other");
        write_model(
            &other,
            &[(
                Tensor {
                    name: "x".into(),
                    shape: vec![N],
                },
                values(3, N, 1.0),
            )],
            HashMap::new(),
        )
        .expect("w");
        let truncated = d.join("truncated");
        let bytes = std::fs::read(&good).expect("r");
        std::fs::write(&truncated, &bytes[..bytes.len() - 4]).expect("w");
        let ups = vec![
            Update {
                path: good.clone(),
                weight: 1.0,
            },
            Update {
                path: garbage,
                weight: 1.0,
            },
            Update {
                path: nan,
                weight: 1.0,
            },
            Update {
                path: other,
                weight: 1.0,
            },
            Update {
                path: truncated,
                weight: 1.0,
            },
            Update {
                path: d.join("missing"),
                weight: 1.0,
            },
            Update {
                path: good.clone(),
                weight: f64::NAN,
            },
        ];
        let out = d.join("out");
        let o =
            aggregate(&base, &ups, &Options::default(), &out, HashMap::new()).expect("aggregated");
        assert_eq!(o.accepted, vec![0]);
        let kinds: Vec<String> = o.rejected.iter().map(|(i, r)| format!("{i}:{r}")).collect();
        assert_eq!(o.rejected.len(), 6, "{kinds:?}");
        assert!(matches!(o.rejected[0], (1, Rejection::Layout)), "{kinds:?}");
        assert!(
            matches!(o.rejected[1], (2, Rejection::NotFinite)),
            "{kinds:?}"
        );
        assert!(matches!(o.rejected[2], (3, Rejection::Layout)), "{kinds:?}");
        assert!(matches!(o.rejected[3], (4, Rejection::Layout)), "{kinds:?}");
        assert!(
            matches!(o.rejected[4], (5, Rejection::Unreadable(_))),
            "{kinds:?}"
        );
        assert!(matches!(o.rejected[5], (6, Rejection::Weight)), "{kinds:?}");
        assert_eq!(
            read_flat(&out).expect("out").1,
            read_flat(&good).expect("good").1
        );
        let none = aggregate(&base, &ups[1..6], &Options::default(), &out, HashMap::new());
        assert!(matches!(none, Err(AggregateError::NoUpdates(r)) if r.len() == 5));
    }

    #[test]
    fn a_plain_server_step_keeps_the_aggregate_and_momentum_accumulates() {
        let d = dir("server");
        let base = write(&d, "base", &[1.0; N]);
        let agg = write(&d, "agg", &[0.5; N]);
        let plain = ServerStep { lr: 1.0, beta: 0.0 };
        assert!(plain.is_plain());
        plain
            .apply(&base, &agg, None, &d.join("m1"), &d.join("v1"), 3)
            .expect("step");
        assert!(
            read_flat(&d.join("m1"))
                .expect("m")
                .1
                .iter()
                .all(|v| *v == 0.5)
        );
        let step = ServerStep { lr: 1.0, beta: 0.9 };
        // First step: momentum = delta = 0.5; second (same delta): 0.9 * 0.5 + 0.5 = 0.95.
        step.apply(&base, &agg, None, &d.join("m2"), &d.join("v2"), 3)
            .expect("step");
        step.apply(
            &base,
            &agg,
            Some(&d.join("v2")),
            &d.join("m3"),
            &d.join("v3"),
            3,
        )
        .expect("step");
        assert!(
            read_flat(&d.join("v3"))
                .expect("v")
                .1
                .iter()
                .all(|v| (*v - 0.95).abs() < 1e-6)
        );
        assert!(
            read_flat(&d.join("m3"))
                .expect("m")
                .1
                .iter()
                .all(|v| (*v - 0.05).abs() < 1e-6)
        );
    }

    /// The hub's audit of a member aggregation (docs/ARCHITECTURE.md, "The audit of member
    /// aggregations") recomputes it and compares digests: the same inputs and options
    /// must give the same bytes, and a changed input or weight other bytes.
    #[test]
    fn an_aggregation_is_reproduced_byte_for_byte_and_a_change_shows() {
        let d = dir("reproduce");
        let base = write(&d, "base", &values(1, N, 1.0));
        let ups: Vec<Update> = (0..5)
            .map(|i| Update {
                path: write(&d, &format!("u{i}"), &values(10 + i, N, 2.0)),
                weight: 1.0 + i as f64,
            })
            .collect();
        for rule in [Rule::Mean, Rule::TrimmedMean { trim: 0.2 }, Rule::Median] {
            let opts = Options {
                rule,
                chunk: 7,
                ..Options::default()
            };
            let run = |ups: &[Update], name: &str| {
                aggregate(&base, ups, &opts, &d.join(name), HashMap::new())
                    .expect("aggregated")
                    .sha256
            };
            let first = run(&ups, "a");
            assert_eq!(first, run(&ups, "b"), "{rule:?}");
            let mut other = ups.clone();
            other[1].path = write(&d, "u1-changed", &values(99, N, 2.0));
            assert_ne!(first, run(&other, "c"), "{rule:?}");
            if rule == Rule::Mean {
                let mut reweighed = ups.clone();
                reweighed[0].weight = 7.0;
                assert_ne!(first, run(&reweighed, "d"));
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    proptest::proptest! {
        #[test]
        fn every_rule_stays_within_the_updates_range(seeds in proptest::collection::vec(0u64..1000, 1..8), rule in 0..3u8) {
            let d = dir(&format!("prop-{}", seeds.iter().sum::<u64>()));
            let base = write(&d, "base", &values(9999, N, 1.0));
            let vs: Vec<Vec<f32>> = seeds.iter().map(|s| values(*s, N, 4.0)).collect();
            let ups: Vec<Update> = vs.iter().enumerate()
                .map(|(i, v)| Update { path: write(&d, &format!("u{i}"), v), weight: 1.0 + i as f64 })
                .collect();
            let rule = [Rule::Mean, Rule::TrimmedMean { trim: 0.25 }, Rule::Median][rule as usize];
            let out = d.join("out");
            let o = aggregate(&base, &ups, &Options { rule, chunk: 4, ..Options::default() }, &out, HashMap::new()).expect("aggregated");
            let (_, got) = read_flat(&out).expect("out");
            for j in 0..N {
                let lo = o.accepted.iter().map(|i| vs[*i][j]).fold(f32::INFINITY, f32::min);
                let hi = o.accepted.iter().map(|i| vs[*i][j]).fold(f32::NEG_INFINITY, f32::max);
                proptest::prop_assert!(got[j] >= lo - 1e-5 && got[j] <= hi + 1e-5);
            }
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
