//! What the node has: GPUs through NVML (loaded at run time, so a machine without the
//! NVIDIA library runs CPU-only after saying so once), CPU and memory from /proc.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};

/// One GPU's identity and current state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gpu {
    /// Index on the node.
    pub index: u32,
    /// Product name (e.g. "NVIDIA H100 80GB HBM3").
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Memory, MiB.
    pub memory_total_mib: u64,
    /// Used memory, MiB.
    pub memory_used_mib: u64,
    /// Utilisation, percent.
    pub utilization: Option<u32>,
    /// Temperature, °C.
    pub temperature: Option<u32>,
    /// Power, watts.
    pub power_watts: Option<f64>,
    /// Energy since driver load, millijoules.
    pub energy_mj: Option<u64>,
    /// Uncorrected volatile ECC errors.
    pub ecc_uncorrected: Option<u64>,
}

/// The GPUs of a node, or why there are none.
pub struct Gpus {
    nvml: Option<Nvml>,
    /// Why NVML is unavailable, if it is.
    pub unavailable: Option<String>,
}

impl Gpus {
    /// Loads NVML. Without it, logs one line and reports no GPUs from then on.
    pub fn init() -> Gpus {
        match Nvml::init() {
            Ok(nvml) => Gpus {
                nvml: Some(nvml),
                unavailable: None,
            },
            Err(e) => {
                tracing::info!(reason = %e, "no NVIDIA GPU or NVIDIA library found; running CPU-only");
                Gpus {
                    nvml: None,
                    unavailable: Some(e.to_string()),
                }
            }
        }
    }

    /// Driver and CUDA driver versions.
    pub fn versions(&self) -> Option<(String, String)> {
        let nvml = self.nvml.as_ref()?;
        let driver = nvml.sys_driver_version().ok()?;
        let cuda = nvml
            .sys_cuda_driver_version()
            .ok()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))?;
        Some((driver, cuda))
    }

    /// Reads every GPU now (fields a device does not support are None).
    pub fn read(&self) -> Vec<Gpu> {
        let Some(nvml) = &self.nvml else {
            return vec![];
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                Some(Gpu {
                    index: i,
                    name: d.name().unwrap_or_default(),
                    uuid: d.uuid().unwrap_or_default(),
                    memory_total_mib: mem.as_ref().map(|m| m.total / (1 << 20)).unwrap_or(0),
                    memory_used_mib: mem.as_ref().map(|m| m.used / (1 << 20)).unwrap_or(0),
                    utilization: d.utilization_rates().ok().map(|u| u.gpu),
                    temperature: d.temperature(TemperatureSensor::Gpu).ok(),
                    power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                    energy_mj: d.total_energy_consumption().ok(),
                    ecc_uncorrected: d
                        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                        .ok(),
                })
            })
            .collect()
    }
}

/// CPU cores available to this process.
pub fn cpu_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Total memory in MiB (from /proc/meminfo).
pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// The CPU model (from /proc/cpuinfo).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_probes_read_this_machine() {
        assert!(cpu_cores() >= 1);
        assert!(memory_mib() > 0);
    }

    #[test]
    fn gpus_without_nvml_are_empty_not_an_error() {
        let gpus = Gpus::init();
        if gpus.unavailable.is_some() {
            assert!(gpus.read().is_empty());
            assert!(gpus.versions().is_none());
        } else {
            // A GPU machine: every device has a name and memory.
            assert!(
                gpus.read()
                    .iter()
                    .all(|g| !g.name.is_empty() && g.memory_total_mib > 0)
            );
        }
    }
}
