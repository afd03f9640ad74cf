//! Leader election with a `coordination.k8s.io/v1` Lease: one replica acts, the others
//! wait. Updates carry the Lease's resourceVersion, so two replicas can never both win.
//!
//! Time is judged as client-go's leader election judges it (docs/ARCHITECTURE.md,
//! "Failure model"):
//! - a follower takes a lease over only when it has seen the lease record stay unchanged
//!   for a whole lease duration *by its own clock*; the renew time the holder wrote is not
//!   trusted (another machine's clock may run ahead or behind);
//! - a leader that cannot renew within the renew deadline (shorter than the lease
//!   duration) stops leading: the process exits and restarts as a follower, so it has
//!   stopped acting before any follower can have taken the lease.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settings of the election.
#[derive(Debug)]
pub struct Election {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a lease stays valid without renewal, as followers see it.
    pub lease_duration: Duration,
    /// How long a leader keeps acting without a successful renewal (less than
    /// `lease_duration`).
    pub renew_deadline: Duration,
    /// How often to try (and renew).
    pub retry_period: Duration,
    /// The lease record as last seen (holder, renew time, resourceVersion) and when this
    /// replica first saw it, by its monotonic clock.
    pub observed: Mutex<Option<(String, Instant)>>,
}

/// What a try found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This replica holds the lease.
    Leading,
    /// Another replica holds a valid lease.
    Following(String),
}

impl Election {
    /// An election with client-go's proportions: renew deadline 2/3 and retry period 1/5
    /// of the lease duration.
    pub fn new(namespace: &str, name: &str, identity: &str, lease_duration: Duration) -> Election {
        Election {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration / 5,
            observed: Mutex::new(None),
        }
    }

    /// Whether the record `seen` has stood unchanged, as this replica watched it, for a
    /// whole lease duration (it starts watching a record when it first sees it).
    fn expired(&self, seen: String) -> bool {
        let Ok(mut observed) = self.observed.lock() else {
            return false;
        };
        match observed.as_ref() {
            Some((record, since)) if *record == seen => since.elapsed() > self.lease_duration,
            _ => {
                *observed = Some((seen, Instant::now()));
                false
            }
        }
    }

    /// One attempt to acquire or renew, bounded by `limit`.
    pub async fn try_acquire(
        &self,
        client: &kube::Client,
        limit: Duration,
    ) -> Result<Outcome, kube::Error> {
        match tokio::time::timeout(limit, self.try_once(client)).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time").into(),
            )),
        }
    }

    async fn try_once(&self, client: &kube::Client) -> Result<Outcome, kube::Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let now = Timestamp::now();
        let fresh = |transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs() as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(mut lease) = api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(fresh(0)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Following(String::new())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity && !holder.is_empty() {
            let record = format!(
                "{holder}|{:?}|{:?}",
                spec.renew_time.as_ref().map(|t| t.0),
                lease.metadata.resource_version
            );
            if !self.expired(record) {
                return Ok(Outcome::Following(holder));
            }
        }
        let mut next =
            fresh(spec.lease_transitions.unwrap_or(0) + i32::from(holder != self.identity));
        if holder == self.identity {
            next.acquire_time = spec.acquire_time;
        }
        lease.spec = Some(next);
        // replace() sends the resourceVersion we read: a concurrent winner makes this 409.
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Outcome::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Following(holder)),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self, client: &kube::Client) {
        let mut last = String::new();
        loop {
            match self.try_acquire(client, self.lease_duration).await {
                Ok(Outcome::Leading) => {
                    tracing::info!(identity = %self.identity, "became leader");
                    return;
                }
                Ok(Outcome::Following(holder)) => {
                    if holder != last {
                        tracing::info!(leader = %holder, "following");
                        last = holder;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.retry_period).await;
        }
    }

    /// Renews while leading; returns when leadership is lost: another holder, or no
    /// successful renewal within the renew deadline (before any follower can take over).
    pub async fn hold(&self, client: &kube::Client) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            // Checked before trying too: a process paused past the deadline (SIGSTOP, a
            // stalled VM) stops at once when it wakes, not one request later.
            if last_renewal.elapsed() > self.renew_deadline {
                tracing::error!(
                    deadline = ?self.renew_deadline,
                    "could not renew the lease within the renew deadline"
                );
                return;
            }
            // A slow answer may use what is left of the deadline.
            let left = self.renew_deadline.saturating_sub(last_renewal.elapsed());
            match self.try_acquire(client, left).await {
                Ok(Outcome::Leading) => last_renewal = Instant::now(),
                Ok(Outcome::Following(holder)) => {
                    tracing::error!(leader = %holder, "lost the lease to another replica");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the lease failed"),
            }
            if last_renewal.elapsed() > self.renew_deadline {
                tracing::error!(
                    deadline = ?self.renew_deadline,
                    "could not renew the lease within the renew deadline"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower trusts only its own clock: a record it has just seen is valid for a
    /// lease duration from then, whatever renew time it carries; a record that changes
    /// restarts the wait.
    #[test]
    fn a_lease_expires_by_the_followers_clock_not_the_holders() {
        let e = Election::new("ns", "lease", "me", Duration::from_millis(200));
        assert_eq!(e.renew_deadline, Duration::from_nanos(133_333_333));
        assert!(
            !e.expired("a|2000-01-01|1".into()),
            "first seen: not expired, however old"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(!e.expired("a|2000-01-01|1".into()));
        // The holder renewed (a new record): the wait starts again.
        assert!(!e.expired("a|2000-01-01T00:00:01|2".into()));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!e.expired("a|2000-01-01T00:00:01|2".into()));
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            e.expired("a|2000-01-01T00:00:01|2".into()),
            "unchanged for 240 ms"
        );
    }
}
