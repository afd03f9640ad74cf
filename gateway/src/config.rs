//! The gateway's configuration: the operator's public key and the endpoints it serves.
//!
//! Read from a YAML file today (`--config`); the fields are the ones an
//! `InferenceEndpoint` will carry, so the API-fed configuration replaces the file without
//! changing the routing code.

use serde::{Deserialize, Serialize};

/// How a request picks its replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Routing {
    /// Power of two choices over (requests in flight + 1) x EWMA latency, among the
    /// replicas in the caller's region when there are any.
    #[default]
    LeastLoaded,
    /// Each ready replica in turn.
    RoundRobin,
}

/// One endpoint the gateway serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    pub namespace: String,
    pub name: String,
    /// The shape of one input row; a request is `[rows, ..inputShape]`.
    pub input_shape: Vec<u32>,
    /// The shape of one output row: a replica whose model answers another shape is not
    /// ready, and a reply of another shape is a failure.
    pub output_shape: Vec<u32>,
    #[serde(default)]
    pub routing: Routing,
    /// Longest a request may take, queueing, retries and all.
    #[serde(default = "default_timeout")]
    pub timeout_millis: u64,
    /// How many times a failed request is tried again, each time on another replica.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Most requests held while no replica is ready; beyond it a request gets 503 at once.
    #[serde(default = "default_queue")]
    pub queue_limit: u32,
    /// Most rows in one request.
    #[serde(default = "default_rows")]
    pub max_rows: u32,
}

fn default_timeout() -> u64 {
    10_000
}
fn default_retries() -> u32 {
    1
}
fn default_queue() -> u32 {
    64
}
fn default_rows() -> u32 {
    1024
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// The operator's ed25519 public key (hex): only credentials it signed are accepted.
    pub verifying_key: String,
    /// The gateway pings each replica this often; 3 missed heartbeats eject it.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_millis: u64,
    /// Consecutive failed requests that eject a replica.
    #[serde(default = "default_failures")]
    pub eject_after_failures: u32,
    /// How long an ejected replica may not connect again.
    #[serde(default = "default_cooldown")]
    pub eject_cooldown_millis: u64,
    /// Inference requests the gateway works on at once; beyond it a request gets 503 at
    /// once (bounds the memory a burst of large requests can take).
    #[serde(default = "default_concurrent")]
    pub max_concurrent_requests: u32,
    pub endpoints: Vec<EndpointConfig>,
}

fn default_heartbeat() -> u64 {
    1_000
}
fn default_failures() -> u32 {
    3
}
fn default_cooldown() -> u64 {
    30_000
}
fn default_concurrent() -> u32 {
    4096
}

impl GatewayConfig {
    /// Parses and checks a YAML configuration; errors name the field.
    pub fn from_yaml(text: &str) -> Result<GatewayConfig, String> {
        let cfg: GatewayConfig = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The operator's public key.
    pub fn key(&self) -> Result<ed25519_dalek::VerifyingKey, String> {
        let bytes: [u8; 32] = hex::decode(self.verifying_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("verifyingKey must be 32 bytes of hex (the operator's ed25519 public key)")?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|e| format!("verifyingKey is not an ed25519 public key: {e}"))
    }

    pub fn validate(&self) -> Result<(), String> {
        self.key()?;
        if self.heartbeat_millis == 0 {
            return Err("heartbeatMillis must be at least 1".into());
        }
        if self.max_concurrent_requests == 0 {
            return Err("maxConcurrentRequests must be at least 1".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = format!("endpoints[{i}]");
            for (field, v) in [("namespace", &e.namespace), ("name", &e.name)] {
                let ok = !v.is_empty()
                    && v.len() <= 63
                    && v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !v.starts_with('-')
                    && !v.ends_with('-');
                if !ok {
                    return Err(format!(
                        "{at}.{field} {v:?} must be a DNS-1123 label (lowercase letters, digits, '-')"
                    ));
                }
            }
            use edgeloom_crds::serving::{FRAME_HEADER, MAX_DIMS, MAX_FRAME};
            if e.timeout_millis == 0 || e.max_rows == 0 {
                return Err(format!(
                    "{at}: timeoutMillis and maxRows must be at least 1"
                ));
            }
            for (field, shape) in [
                ("inputShape", &e.input_shape),
                ("outputShape", &e.output_shape),
            ] {
                if shape.is_empty() || shape.len() >= MAX_DIMS || shape.contains(&0) {
                    return Err(format!(
                        "{at}.{field} {shape:?} must have 1 to {} dimensions, none zero",
                        MAX_DIMS - 1
                    ));
                }
                // The largest request (or reply) must fit in one frame.
                let values = shape
                    .iter()
                    .try_fold(u64::from(e.max_rows), |n, d| n.checked_mul(u64::from(*d)));
                if values.is_none_or(|v| v * 4 + FRAME_HEADER as u64 > MAX_FRAME as u64) {
                    return Err(format!(
                        "{at}: maxRows {} x {field} {shape:?} float32 values do not fit in one {} MiB frame; lower maxRows",
                        e.max_rows,
                        MAX_FRAME >> 20
                    ));
                }
            }
            if !seen.insert((e.namespace.clone(), e.name.clone())) {
                return Err(format!("{at} repeats {}/{}", e.namespace, e.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn yaml(endpoint: &str) -> String {
        format!("verifyingKey: {KEY}\nendpoints:\n- namespace: ml\n{endpoint}")
    }

    #[test]
    fn defaults_and_errors_that_name_the_field() {
        let cfg = GatewayConfig::from_yaml(&yaml(
            "  name: digits\n  inputShape: [64]\n  outputShape: [10]\n",
        ))
        .unwrap();
        let e = &cfg.endpoints[0];
        assert_eq!(e.routing, Routing::LeastLoaded);
        assert_eq!(
            (e.timeout_millis, e.retries, e.queue_limit),
            (10_000, 1, 64)
        );
        assert_eq!(
            (
                cfg.heartbeat_millis,
                cfg.eject_after_failures,
                cfg.eject_cooldown_millis
            ),
            (1_000, 3, 30_000)
        );

        let bad = |yaml: String, want: &str| {
            let err = GatewayConfig::from_yaml(&yaml).unwrap_err();
            assert!(err.contains(want), "{err} does not contain {want}");
        };
        bad(
            yaml("  name: Digits\n  inputShape: [64]\n  outputShape: [10]\n"),
            "endpoints[0].name",
        );
        bad(
            yaml("  name: d\n  inputShape: []\n  outputShape: [10]\n"),
            "endpoints[0].inputShape",
        );
        bad(yaml("  name: d\n  inputShape: [64]\n"), "outputShape");
        bad(
            yaml("  name: d\n  inputShape: [4096, 4096]\n  outputShape: [1]\n"),
            "do not fit in one 64 MiB frame",
        );
        bad("verifyingKey: abc\nendpoints: []\n".into(), "verifyingKey");
        bad(
            yaml("  name: d\n  inputShape: [1]\n  outputShape: [1]\n  rutting: RoundRobin\n"),
            "rutting",
        );
    }
}
