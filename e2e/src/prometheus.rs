//! A real Prometheus server (Debian's package, installed into the cache by
//! e2e/scripts/install-tools.sh) scraping edgeloom processes on 127.0.0.1, with the alert
//! rules and dashboard queries of the Helm chart.

use crate::control_plane::free_port;
use crate::helm;
use crate::process::Process;
use crate::scrape;
use crate::tools::{self, MissingTool};
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors of the Prometheus helpers.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// prometheus or promtool is missing.
    #[error(transparent)]
    Missing(#[from] MissingTool),
    /// helm failed.
    #[error(transparent)]
    Helm(#[from] helm::HelmError),
    /// A file or process could not be handled.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A command failed.
    #[error("{0} failed: {1}")]
    Command(String, String),
    /// A response or file could not be understood.
    #[error("{0}")]
    Parse(String),
    /// Prometheus did not become ready.
    #[error("prometheus did not become ready within {0:?}; log:\n{1}")]
    NotReady(Duration, String),
}

/// The rendered chart's PrometheusRule as a Prometheus rule file (JSON, which is YAML),
/// written to `path`.
pub fn write_chart_rules(path: &Path) -> Result<serde_json::Value, PrometheusError> {
    let rendered = helm::template(&["prometheusRule.enabled=true"])?;
    let rule = crate::manifests::parse(&rendered)
        .map_err(|e| PrometheusError::Parse(e.to_string()))?
        .into_iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "PrometheusRule"))
        .ok_or_else(|| PrometheusError::Parse("the chart rendered no PrometheusRule".into()))?;
    let spec = rule.data["spec"].clone();
    std::fs::write(
        path,
        serde_json::to_string_pretty(&spec).unwrap_or_default(),
    )
    .map_err(|e| PrometheusError::Io(path.display().to_string(), e))?;
    Ok(spec)
}

/// Every alert of a rule file's spec: (name, expression).
pub fn alerts(spec: &serde_json::Value) -> Vec<(String, String)> {
    spec["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| {
            Some((
                r["alert"].as_str()?.to_string(),
                r["expr"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// A dashboard panel's query.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    /// Panel title.
    pub title: String,
    /// Panel description (says when the panel may be empty: "Empty while/without ...").
    pub description: String,
    /// PromQL.
    pub expr: String,
}

impl PanelQuery {
    /// Whether the panel says it may be empty.
    pub fn may_be_empty(&self) -> bool {
        self.description.contains("Empty ")
    }
}

/// Every query of the chart's Grafana dashboard.
pub fn dashboard_queries() -> Result<Vec<PanelQuery>, PrometheusError> {
    let path = helm::chart_dir().join("files/dashboard.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| PrometheusError::Io(path.display().to_string(), e))?;
    let dash: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PrometheusError::Parse(e.to_string()))?;
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(PanelQuery {
                    title: p["title"].as_str().unwrap_or_default().to_string(),
                    description: p["description"].as_str().unwrap_or_default().to_string(),
                    expr: expr.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// `promtool check rules FILE`: Ok(output) or the error output.
pub fn promtool_check_rules(path: &Path) -> Result<String, PrometheusError> {
    let promtool = tools::tool("promtool")?;
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(path)
        .output()
        .map_err(|e| PrometheusError::Io("promtool".into(), e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(PrometheusError::Command(
            "promtool check rules".into(),
            text,
        ))
    }
}

/// A running Prometheus.
pub struct Prometheus {
    /// The process.
    pub process: Process,
    /// Port of its HTTP API and UI on 127.0.0.1.
    pub port: u16,
}

impl Prometheus {
    /// Starts Prometheus in `dir`, scraping every second `jobs` (name, ports on 127.0.0.1)
    /// with the rule file `rules`, if any.
    pub async fn start(
        dir: &Path,
        jobs: &[(&str, Vec<u16>)],
        rules: Option<&Path>,
    ) -> Result<Prometheus, PrometheusError> {
        let bin = tools::tool("prometheus")?;
        let port = free_port().map_err(|e| PrometheusError::Parse(e.to_string()))?;
        let scrape: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(name, ports)| {
                serde_json::json!({
                    "job_name": name,
                    "static_configs": [{"targets": ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>()}]
                })
            })
            .collect();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules.map(|r| vec![r.display().to_string()]).unwrap_or_default(),
            "scrape_configs": scrape,
        });
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config.to_string())
            .map_err(|e| PrometheusError::Io(config_path.display().to_string(), e))?;
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--web.enable-lifecycle".into(),
        ];
        let process = Process::spawn("prometheus", &bin, &args, &dir.join("prometheus.log"))
            .map_err(|e| PrometheusError::Io("starting prometheus".into(), e))?;
        let p = Prometheus { process, port };
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        loop {
            if matches!(scrape::get(port, "/-/ready").await, Ok((200, _))) {
                return Ok(p);
            }
            if start.elapsed() > timeout {
                return Err(PrometheusError::NotReady(timeout, p.process.log_tail(20)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// GETs an API path; the parsed JSON body.
    pub async fn api(&self, path: &str) -> Result<serde_json::Value, PrometheusError> {
        let (code, body) = scrape::get(self.port, path)
            .await
            .map_err(|e| PrometheusError::Io(path.into(), e))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| PrometheusError::Parse(format!("{path}: HTTP {code}: {e}: {body}")))?;
        Ok(v)
    }

    /// An instant query: Ok(result vector) when Prometheus evaluated it, Err(its error).
    pub async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, PrometheusError> {
        let v = self
            .api(&format!("/api/v1/query?query={}", scrape::encode(expr)))
            .await?;
        if v["status"] != "success" {
            return Err(PrometheusError::Parse(format!(
                "{expr}: {} {}",
                v["errorType"], v["error"]
            )));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `n` targets are up (Prometheus hands new targets to its scrapers only
    /// every few seconds), so that what follows is recorded from its start.
    pub async fn wait_targets_up(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<(), PrometheusError> {
        let start = Instant::now();
        loop {
            let v = self.api("/api/v1/targets").await?;
            let up = v["data"]["activeTargets"]
                .as_array()
                .map(|t| t.iter().filter(|t| t["health"] == "up").count())
                .unwrap_or(0);
            if up >= n {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(PrometheusError::NotReady(
                    timeout,
                    format!("{up}/{n} targets up: {v}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The URL of its UI.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
