//! Shared helpers of the benchmark programs.

pub mod verification;

/// The p-th percentile (0..=100) of `samples` (sorted in place).
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// A small deterministic generator (xorshift64*), so every run sees the same fleet.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
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
}

/// The sum over its series of metric `name` on the /metrics of a process listening on
/// 127.0.0.1:`port` (0 when it cannot be read).
pub async fn metric(port: u16, name: &str) -> f64 {
    edgeloom_e2e::scrape::get(port, "/metrics")
        .await
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

/// A binary next to the running one (the release build of the workspace).
pub fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.is_file() {
        anyhow::bail!(
            "{} not found: cargo build --release --workspace --bins",
            p.display()
        );
    }
    Ok(p)
}

/// A hub and two member clusters `m1`, `m2` without nodes or controller managers, linked
/// (CRDs, the system namespace, member kubeconfig Secrets in the hub); returns the hub's
/// client.
pub async fn two_members() -> anyhow::Result<(edgeloom_e2e::ControlPlane, kube::Client)> {
    let plane = edgeloom_e2e::ControlPlane::start(edgeloom_e2e::Config {
        members: vec!["m1".into(), "m2".into()],
        nodes_per_member: 0,
        controller_manager: false,
        ..edgeloom_e2e::Config::default()
    })
    .await?;
    let hub = edgeloom_e2e::federation::link_members(&plane).await?;
    Ok((plane, hub))
}
