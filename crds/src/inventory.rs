//! What is known about a node (docs/ARCHITECTURE.md, "Nodes"): labels and annotations on
//! the Node object, and the heartbeat Lease. No extra CRD for nodes.
//!
//! Who writes what: the agent writes only its inventory ([`AGENT_LABEL_KEYS`],
//! [`AGENT_ANNOTATION_KEYS`]); these are claims. Every other label, among them the
//! contributor account ([`ACCOUNT_LABEL`]) and anything a job's placement may require
//! (region, zone, residency), belongs to the platform team: the chart's node-identity
//! admission policy refuses an agent that changes one.

use std::collections::BTreeMap;

/// Label: `"true"` on nodes that run an edgeloom agent.
pub const AGENT_LABEL: &str = "edgeloom.io/agent";
/// Label: the contributor account paid for this node's work. Set by the platform team
/// (`kubectl label node`), never by the agent.
pub const ACCOUNT_LABEL: &str = "edgeloom.io/account";
/// Label: number of GPUs.
pub const GPU_COUNT_LABEL: &str = "edgeloom.io/gpu-count";
/// Label: memory of each GPU in MiB.
pub const GPU_MEMORY_LABEL: &str = "edgeloom.io/gpu-memory-mib";
/// Annotation: the GPU product as NVML names it (may contain spaces, so not a label).
pub const GPU_PRODUCT_ANNOTATION: &str = "edgeloom.io/gpu-product";
/// Annotation: CPU cores the agent offers.
pub const CPU_CORES_ANNOTATION: &str = "edgeloom.io/cpu-cores";
/// Annotation: memory the agent offers, in MiB.
pub const MEMORY_ANNOTATION: &str = "edgeloom.io/memory-mib";
/// Annotation: measured speed in TFLOP/s (the Benchmark workload at agent start).
pub const TFLOPS_ANNOTATION: &str = "edgeloom.io/tflops";
/// Annotation: comma-separated node-local datasets the node holds.
pub const DATASETS_ANNOTATION: &str = "edgeloom.io/datasets";
/// Annotation: the contributor's price factor (1.0 = the pool's rate), used in scoring.
pub const PRICE_ANNOTATION: &str = "edgeloom.io/price-factor";
/// Annotation: how many tasks the agent runs at once (its `maxTasks`). The pool's
/// `maxTasksPerNode` only caps it.
pub const TASK_SLOTS_ANNOTATION: &str = "edgeloom.io/task-slots";

/// Annotation: the agent's X25519 public key (hex). The operator seals what only this
/// node may read to it (a Federated task's presigned URLs): every agent can read every
/// task of its cluster, but only this one can open them.
pub const BOX_KEY_ANNOTATION: &str = "edgeloom.io/box-key";

/// The Node labels an agent may write (add, change or remove); all others are the
/// platform team's. The chart's admission policy lists the same keys (a test checks).
pub const AGENT_LABEL_KEYS: &[&str] = &[AGENT_LABEL, GPU_COUNT_LABEL, GPU_MEMORY_LABEL];
/// The Node annotations an agent may write; all others are the platform team's.
pub const AGENT_ANNOTATION_KEYS: &[&str] = &[
    GPU_PRODUCT_ANNOTATION,
    CPU_CORES_ANNOTATION,
    MEMORY_ANNOTATION,
    TFLOPS_ANNOTATION,
    DATASETS_ANNOTATION,
    PRICE_ANNOTATION,
    TASK_SLOTS_ANNOTATION,
    BOX_KEY_ANNOTATION,
];

/// Label: the owner of several contributor accounts, where the platform team knows one
/// (never the agent's). Two replicas of a shard never run on nodes of one owner.
pub const OWNER_LABEL: &str = "edgeloom.io/owner";
/// The kubelet's label of a node's CPU architecture (part of its determinism class).
pub const ARCH_LABEL: &str = "kubernetes.io/arch";

/// ConfigMap in each member's system namespace where the operator publishes its pools'
/// latest signed ledger checkpoints (key: pool name, value: the checkpoint as JSON).
pub const CHECKPOINTS_CONFIGMAP: &str = "edgeloom-ledger-checkpoints";
/// Annotation on an agent's heartbeat Lease: the latest signed checkpoint of each pool it
/// has seen (JSON object, pool -> checkpoint), kept as the contributor's evidence.
pub const CHECKPOINTS_ANNOTATION: &str = "edgeloom.io/ledger-checkpoints";

/// Namespace in member clusters that holds ComputeTasks and agent heartbeat Leases.
pub const SYSTEM_NAMESPACE: &str = "edgeloom-system";
/// Label on agent heartbeat Leases (named after the node).
pub const HEARTBEAT_LABEL: &str = "edgeloom.io/heartbeat";

/// A node's offer, parsed from its labels and annotations. Missing or malformed values
/// read as "none", so a half-configured node is simply a small one.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct NodeInventory {
    /// Runs an agent.
    pub agent: bool,
    /// Contributor account (the platform team's label; never published by the agent).
    pub account: Option<String>,
    /// GPU product name.
    pub gpu_product: Option<String>,
    /// Number of GPUs.
    pub gpus: u32,
    /// Memory per GPU in MiB.
    pub gpu_memory_mib: u64,
    /// CPU cores offered.
    pub cpu_cores: u32,
    /// Memory offered in MiB.
    pub memory_mib: u64,
    /// Measured TFLOP/s.
    pub tflops: f64,
    /// Node-local datasets.
    pub datasets: Vec<String>,
    /// Price factor (default 1).
    pub price_factor: f64,
    /// Tasks the agent runs at once (0: not advertised, the pool's cap applies).
    pub task_slots: u32,
    /// The agent's X25519 public key (hex), for what the operator seals to this node.
    pub box_key: Option<String>,
}

impl NodeInventory {
    /// Reads the inventory from a node's labels and annotations.
    pub fn parse(
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> NodeInventory {
        let num = |map: &BTreeMap<String, String>, key: &str| {
            map.get(key).and_then(|v| v.trim().parse::<u64>().ok())
        };
        let float = |key: &str| {
            annotations
                .get(key)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|f| f.is_finite() && *f >= 0.0)
        };
        NodeInventory {
            agent: labels.get(AGENT_LABEL).is_some_and(|v| v == "true"),
            account: labels.get(ACCOUNT_LABEL).filter(|v| !v.is_empty()).cloned(),
            gpu_product: annotations
                .get(GPU_PRODUCT_ANNOTATION)
                .filter(|v| !v.is_empty())
                .cloned(),
            gpus: num(labels, GPU_COUNT_LABEL)
                .unwrap_or(0)
                .min(u32::MAX as u64) as u32,
            gpu_memory_mib: num(labels, GPU_MEMORY_LABEL).unwrap_or(0),
            cpu_cores: num(annotations, CPU_CORES_ANNOTATION)
                .unwrap_or(0)
                .min(u32::MAX as u64) as u32,
            memory_mib: num(annotations, MEMORY_ANNOTATION).unwrap_or(0),
            tflops: float(TFLOPS_ANNOTATION).unwrap_or(0.0),
            datasets: annotations
                .get(DATASETS_ANNOTATION)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            price_factor: float(PRICE_ANNOTATION).unwrap_or(1.0),
            task_slots: num(annotations, TASK_SLOTS_ANNOTATION)
                .unwrap_or(0)
                .min(u32::MAX as u64) as u32,
            box_key: annotations
                .get(BOX_KEY_ANNOTATION)
                .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
                .cloned(),
        }
    }

    /// The labels and annotations that publish this inventory (what the agent writes:
    /// only keys of [`AGENT_LABEL_KEYS`] and [`AGENT_ANNOTATION_KEYS`], so never the
    /// account).
    pub fn to_metadata(&self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let mut labels = BTreeMap::new();
        let mut annotations = BTreeMap::new();
        labels.insert(AGENT_LABEL.to_string(), self.agent.to_string());
        labels.insert(GPU_COUNT_LABEL.to_string(), self.gpus.to_string());
        labels.insert(
            GPU_MEMORY_LABEL.to_string(),
            self.gpu_memory_mib.to_string(),
        );
        if let Some(p) = &self.gpu_product {
            annotations.insert(GPU_PRODUCT_ANNOTATION.to_string(), p.clone());
        }
        annotations.insert(CPU_CORES_ANNOTATION.to_string(), self.cpu_cores.to_string());
        annotations.insert(MEMORY_ANNOTATION.to_string(), self.memory_mib.to_string());
        annotations.insert(TFLOPS_ANNOTATION.to_string(), format!("{:.4}", self.tflops));
        annotations.insert(DATASETS_ANNOTATION.to_string(), self.datasets.join(","));
        annotations.insert(PRICE_ANNOTATION.to_string(), self.price_factor.to_string());
        if self.task_slots > 0 {
            annotations.insert(
                TASK_SLOTS_ANNOTATION.to_string(),
                self.task_slots.to_string(),
            );
        }
        if let Some(k) = &self.box_key {
            annotations.insert(BOX_KEY_ANNOTATION.to_string(), k.clone());
        }
        (labels, annotations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_metadata() {
        let inv = NodeInventory {
            agent: true,
            account: Some("alice".into()),
            gpu_product: Some("NVIDIA H100 80GB HBM3".into()),
            gpus: 2,
            gpu_memory_mib: 81_559,
            cpu_cores: 16,
            memory_mib: 65_536,
            tflops: 1.5,
            datasets: vec!["clinic-records".into(), "cams".into()],
            price_factor: 0.8,
            task_slots: 2,
            box_key: Some("ab".repeat(32)),
        };
        let (mut labels, annotations) = inv.to_metadata();
        assert!(
            labels
                .keys()
                .all(|k| AGENT_LABEL_KEYS.contains(&k.as_str()))
        );
        assert!(
            annotations
                .keys()
                .all(|k| AGENT_ANNOTATION_KEYS.contains(&k.as_str()))
        );
        assert!(
            !labels.contains_key(ACCOUNT_LABEL),
            "the agent never writes the account"
        );
        labels.insert(ACCOUNT_LABEL.into(), "alice".into());
        assert_eq!(NodeInventory::parse(&labels, &annotations), inv);
    }

    #[test]
    fn the_admission_policy_lets_the_agent_write_exactly_its_inventory_keys() {
        let policy = include_str!("../../charts/edgeloom/templates/admission-policy.yaml");
        let list = |name: &str| -> Vec<String> {
            let line = policy
                .lines()
                .skip_while(|l| !l.contains(&format!("name: {name}")))
                .nth(1)
                .unwrap_or_else(|| panic!("variable {name} in the policy"));
            let inner = line.split('[').nth(1).and_then(|r| r.split(']').next());
            inner
                .unwrap_or_else(|| panic!("a list in {line}"))
                .split(',')
                .map(|k| k.trim().trim_matches('\'').to_string())
                .collect()
        };
        assert_eq!(list("agentLabelKeys"), AGENT_LABEL_KEYS);
        assert_eq!(list("agentAnnotationKeys"), AGENT_ANNOTATION_KEYS);
    }

    #[test]
    fn malformed_values_read_as_nothing() {
        let labels = BTreeMap::from([(GPU_COUNT_LABEL.to_string(), "many".to_string())]);
        let annotations = BTreeMap::from([(TFLOPS_ANNOTATION.to_string(), "-3".to_string())]);
        let inv = NodeInventory::parse(&labels, &annotations);
        assert!(!inv.agent);
        assert_eq!(inv.gpus, 0);
        assert_eq!(inv.tflops, 0.0);
        assert_eq!(inv.price_factor, 1.0);
    }
}
