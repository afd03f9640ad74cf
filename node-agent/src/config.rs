//! The agent's configuration: a YAML file (optional) plus flags.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Agent settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// Node this agent serves (default: $NODE_NAME, from the downward API).
    pub node: String,
    /// Not accepted: the contributor account is the platform team's Node label
    /// `edgeloom.io/account`, never the agent's (read only to refuse it with a clear error).
    pub account: Option<String>,
    /// Path of edgeloom-runner.
    pub runner: PathBuf,
    /// Tasks run at once.
    pub max_tasks: usize,
    /// Seconds between heartbeat renewals.
    pub heartbeat_seconds: u64,
    /// Node-local datasets: name -> CSV file (features..., label). Their data never leaves.
    pub datasets: BTreeMap<String, PathBuf>,
    /// Working directory (task logs, checkpoints).
    pub work_dir: PathBuf,
    /// CPU cores offered (default: all this process may use).
    pub cpu_cores: Option<u32>,
    /// Memory offered in MiB (default: the machine's).
    pub memory_mib: Option<u64>,
    /// The contributor's price factor (1 = the pool's rate).
    pub price_factor: f64,
    /// Matrix size of the start-up benchmark; 0 skips it.
    pub benchmark_matrix_size: u32,
    /// Seconds a running task may finish after SIGTERM before it is failed.
    pub shutdown_grace_seconds: u64,
    /// TEST ONLY: report altered result digests, to test that verification outvotes a
    /// cheating node. Never set this on a real node.
    pub corrupt_results: bool,
    /// TEST ONLY: an adversary that does no work and reports what another replica of the
    /// same shard reported (its commitment, then its reveal), to test that commit–reveal
    /// catches a copier. Never set this on a real node.
    pub copy_peers: bool,
    /// TEST ONLY: claim 1000 times the CPU time used and an hour of GPU time on every
    /// task, to test that the operator pays only what it observed. Never set this on a
    /// real node.
    pub inflate_usage: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: std::env::var("NODE_NAME").unwrap_or_default(),
            account: None,
            runner: PathBuf::from("edgeloom-runner"),
            max_tasks: 1,
            heartbeat_seconds: 5,
            datasets: BTreeMap::new(),
            work_dir: std::env::temp_dir().join("edgeloom-agent"),
            cpu_cores: None,
            memory_mib: None,
            price_factor: 1.0,
            benchmark_matrix_size: 512,
            shutdown_grace_seconds: 20,
            corrupt_results: false,
            copy_peers: false,
            inflate_usage: false,
        }
    }
}

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    /// The YAML is invalid.
    #[error("{0}: {1}")]
    Yaml(String, String),
    /// A required value is missing.
    #[error("{0}")]
    Missing(&'static str),
    /// A setting the agent may not have.
    #[error("{0}")]
    NotAllowed(&'static str),
}

impl Config {
    /// Reads a YAML file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Io(path.display().to_string(), e))?;
        serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::Yaml(path.display().to_string(), e.to_string()))
    }

    /// Checks what cannot be defaulted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.is_empty() {
            return Err(ConfigError::Missing(
                "no node name: set --node, `node:` in the config, or NODE_NAME",
            ));
        }
        if self.account.is_some() {
            return Err(ConfigError::NotAllowed(
                "`account:` is no longer an agent setting: the platform team sets the node's account with `kubectl label node NODE edgeloom.io/account=ACCOUNT`, and the agent may not change it",
            ));
        }
        if self.max_tasks == 0 {
            return Err(ConfigError::Missing("maxTasks must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_with_defaults() {
        let dir =
            std::env::temp_dir().join(format!("edgeloom-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("agent.yaml");
        std::fs::write(
            &path,
            "node: n1\ndatasets:\n  clinic-records: /data/clinic.csv\nmaxTasks: 2\n",
        )
        .expect("write");
        let c = Config::from_file(&path).expect("parses");
        assert_eq!(
            (c.node.as_str(), c.max_tasks, c.heartbeat_seconds),
            ("n1", 2, 5)
        );
        assert_eq!(
            c.datasets["clinic-records"],
            PathBuf::from("/data/clinic.csv")
        );
        c.validate().expect("valid");
        std::fs::write(&path, "node: n1\naccount: alice\n").expect("write");
        let err = Config::from_file(&path)
            .expect("parses")
            .validate()
            .expect_err("an account set by the agent is refused");
        assert!(err.to_string().contains("edgeloom.io/account"), "{err}");
        std::fs::write(&path, "maxTasks: [").expect("write");
        assert!(Config::from_file(&path).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
