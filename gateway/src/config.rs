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
    pub endpoints: Vec<EndpointConfig>,
}

fn default_heartbeat() -> u64 {
    1_000
}
fn default_failures() -> u32 {
    3
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
            if e.input_shape.is_empty()
                || e.input_shape.len() >= edgeloom_crds::serving::MAX_DIMS
                || e.input_shape.contains(&0)
            {
                return Err(format!(
                    "{at}.inputShape {:?} must have 1 to {} dimensions, none zero",
                    e.input_shape,
                    edgeloom_crds::serving::MAX_DIMS - 1
                ));
            }
            if e.timeout_millis == 0 || e.max_rows == 0 {
                return Err(format!(
                    "{at}: timeoutMillis and maxRows must be at least 1"
                ));
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

    #[test]
    fn defaults_and_errors_that_name_the_field() {
        let cfg = GatewayConfig::from_yaml(&format!(
            "verifyingKey: {KEY}\nendpoints:\n- namespace: ml\n  name: digits\n  inputShape: [64]\n"
        ))
        .unwrap();
        let e = &cfg.endpoints[0];
        assert_eq!(e.routing, Routing::LeastLoaded);
        assert_eq!(
            (e.timeout_millis, e.retries, e.queue_limit),
            (10_000, 1, 64)
        );
        assert_eq!(cfg.heartbeat_millis, 1_000);

        let bad = |yaml: String, want: &str| {
            let err = GatewayConfig::from_yaml(&yaml).unwrap_err();
            assert!(err.contains(want), "{err} does not contain {want}");
        };
        bad(
            format!(
                "verifyingKey: {KEY}\nendpoints:\n- namespace: ml\n  name: Digits\n  inputShape: [64]\n"
            ),
            "endpoints[0].name",
        );
        bad(
            format!(
                "verifyingKey: {KEY}\nendpoints:\n- namespace: ml\n  name: d\n  inputShape: []\n"
            ),
            "endpoints[0].inputShape",
        );
        bad("verifyingKey: abc\nendpoints: []\n".into(), "verifyingKey");
        bad(
            format!(
                "verifyingKey: {KEY}\nendpoints:\n- namespace: ml\n  name: d\n  inputShape: [1]\n  rutting: RoundRobin\n"
            ),
            "rutting",
        );
    }
}
