//! Leader election with a `coordination.k8s.io/v1` Lease: one replica acts, the others
//! wait. Updates carry the Lease's resourceVersion, so two replicas can never both win.
//! A leader that cannot renew within the lease duration stops leading (the process exits
//! and restarts as a follower), as client-go's leader election does.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct Election {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often to try (and renew).
    pub retry_period: Duration,
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
    /// One attempt to acquire or renew.
    pub async fn try_acquire(&self, client: &kube::Client) -> Result<Outcome, kube::Error> {
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
        let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64);
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| now > t.0 + duration);
        if holder != self.identity && !expired && !holder.is_empty() {
            return Ok(Outcome::Following(holder));
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
            match self.try_acquire(client).await {
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

    /// Renews while leading; returns when leadership is lost (another holder, or no
    /// successful renewal within the lease duration).
    pub async fn hold(&self, client: &kube::Client) {
        let mut last_renewal = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            match self.try_acquire(client).await {
                Ok(Outcome::Leading) => last_renewal = std::time::Instant::now(),
                Ok(Outcome::Following(holder)) => {
                    tracing::error!(leader = %holder, "lost the lease to another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease failed");
                    if last_renewal.elapsed() > self.lease_duration {
                        tracing::error!("could not renew the lease in time");
                        return;
                    }
                }
            }
        }
    }
}
