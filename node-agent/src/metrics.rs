//! The agent's metrics: GPU gauges under the DCGM exporter's names (so existing GPU
//! dashboards work) with its labels (gpu, UUID, modelName, Hostname), and
//! `edgeloom_agent_*` for tasks, throughput and heartbeats.

use crate::probe::Gpu;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    dcgm: Vec<(&'static str, GaugeVec)>,
    /// Tasks finished, by outcome.
    pub tasks: IntCounterVec,
    /// Tasks running now.
    pub running: IntGauge,
    /// Task wall time.
    pub task_seconds: Histogram,
    /// Samples per second of the last finished task that reported it.
    pub samples_per_second: prometheus::Gauge,
    /// Measured speed of this node.
    pub tflops: prometheus::Gauge,
    /// Heartbeats renewed.
    pub heartbeats: IntCounter,
    /// Heartbeats that failed.
    pub heartbeat_failures: IntCounter,
    /// Ledger checkpoints shown by the hub that do not extend one seen before.
    pub checkpoint_conflicts: IntCounter,
}

const DCGM: [(&str, &str); 6] = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
    ),
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let mut dcgm = Vec::new();
        for (name, help) in DCGM {
            let g = GaugeVec::new(
                Opts::new(name, help),
                &["gpu", "UUID", "modelName", "Hostname"],
            )?;
            registry.register(Box::new(g.clone()))?;
            dcgm.push((name, g));
        }
        let tasks = IntCounterVec::new(
            Opts::new("edgeloom_agent_tasks_total", "Tasks finished by outcome"),
            &["outcome"],
        )?;
        let running = IntGauge::new("edgeloom_agent_tasks_running", "Tasks running now")?;
        let task_seconds = Histogram::with_opts(
            HistogramOpts::new("edgeloom_agent_task_duration_seconds", "Task wall time")
                .buckets(vec![1.0, 5.0, 30.0, 120.0, 600.0, 3600.0]),
        )?;
        let samples_per_second = prometheus::Gauge::new(
            "edgeloom_agent_samples_per_second",
            "Throughput of the last task that reported one",
        )?;
        let tflops = prometheus::Gauge::new(
            "edgeloom_agent_node_tflops",
            "Measured TFLOP/s of this node",
        )?;
        let heartbeats = IntCounter::new(
            "edgeloom_agent_heartbeats_total",
            "Heartbeat Lease renewals",
        )?;
        let heartbeat_failures = IntCounter::new(
            "edgeloom_agent_heartbeat_failures_total",
            "Failed heartbeat renewals",
        )?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(task_seconds.clone()))?;
        registry.register(Box::new(samples_per_second.clone()))?;
        registry.register(Box::new(tflops.clone()))?;
        registry.register(Box::new(heartbeats.clone()))?;
        let checkpoint_conflicts = IntCounter::new(
            "edgeloom_agent_ledger_checkpoint_conflicts_total",
            "Ledger checkpoints shown by the hub that do not extend the one this agent kept (smaller, or another root at the same size)",
        )?;
        registry.register(Box::new(heartbeat_failures.clone()))?;
        registry.register(Box::new(checkpoint_conflicts.clone()))?;
        // Start at 0 so the first finished task is an increase, not a new series.
        for outcome in ["succeeded", "failed", "cancelled"] {
            tasks.with_label_values(&[outcome]).inc_by(0);
        }
        Ok(Metrics {
            registry,
            dcgm,
            tasks,
            running,
            task_seconds,
            samples_per_second,
            tflops,
            heartbeats,
            heartbeat_failures,
            checkpoint_conflicts,
        })
    }

    /// Updates the DCGM gauges from a GPU reading.
    pub fn observe_gpus(&self, gpus: &[Gpu], hostname: &str) {
        for g in gpus {
            let index = g.index.to_string();
            let labels = [index.as_str(), g.uuid.as_str(), g.name.as_str(), hostname];
            let values = [
                g.utilization.map(f64::from),
                Some(g.memory_used_mib as f64),
                Some(g.memory_total_mib.saturating_sub(g.memory_used_mib) as f64),
                g.temperature.map(f64::from),
                g.power_watts,
                g.energy_mj.map(|e| e as f64),
            ];
            for ((_, gauge), value) in self.dcgm.iter().zip(values) {
                if let Some(v) = value {
                    gauge.with_label_values(&labels).set(v);
                }
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_readings_appear_under_dcgm_names_and_labels() {
        let m = Metrics::new().expect("metrics");
        let gpu = Gpu {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: "GPU-1234".into(),
            memory_total_mib: 81_559,
            memory_used_mib: 1_000,
            utilization: Some(37),
            temperature: Some(41),
            power_watts: Some(123.5),
            energy_mj: Some(987_654),
            ecc_uncorrected: Some(0),
        };
        m.observe_gpus(&[gpu], "edge-a-node-0");
        let text = m.render();
        for want in [
            "DCGM_FI_DEV_GPU_UTIL{Hostname=\"edge-a-node-0\",UUID=\"GPU-1234\",gpu=\"0\",modelName=\"NVIDIA H100 80GB HBM3\"} 37",
            "DCGM_FI_DEV_FB_FREE{Hostname=\"edge-a-node-0\",UUID=\"GPU-1234\",gpu=\"0\",modelName=\"NVIDIA H100 80GB HBM3\"} 80559",
            "DCGM_FI_DEV_POWER_USAGE{Hostname=\"edge-a-node-0\",UUID=\"GPU-1234\",gpu=\"0\",modelName=\"NVIDIA H100 80GB HBM3\"} 123.5",
        ] {
            assert!(text.contains(want), "missing {want} in {text}");
        }
    }
}
