//! Leader election on a `coordination.k8s.io` Lease, so two operator replicas never reconcile at
//! once. Writes go through `replace` with the read `resourceVersion`: when two replicas race,
//! the API server accepts one write and answers 409 to the other.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} lease {name}: {source}")]
    Api {
        action: &'static str,
        name: String,
        source: kube::Error,
    },
}

/// What a candidate does with the Lease as it finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder stopped renewing (or released it): take over.
    TakeOver,
    /// Another holder is live: stand by.
    Wait,
}

/// Decides from the Lease as read. Pure.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.map(|l| l.spec.clone().unwrap_or_default()) else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
            match spec.renew_time.or(spec.acquire_time) {
                Some(MicroTime(renewed)) if renewed + duration > now => Decision::Wait,
                _ => Decision::TakeOver,
            }
        }
    }
}

/// One candidate for one Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        holder: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            holder: holder.into(),
            duration,
        }
    }

    /// How long a holder may go without renewing before others take over.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn err(&self, action: &'static str) -> impl FnOnce(kube::Error) -> Error + '_ {
        move |source| Error::Api {
            action,
            name: self.name.clone(),
            source,
        }
    }

    /// Takes or renews the Lease; `Ok(true)` while this candidate leads.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.err("get"))?;
        let decision = decide(current.as_ref(), &self.holder, now);
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let result = match (decision, current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(0, None)),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(drop)
            }
            (decision, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0);
                lease.spec = Some(if decision == Decision::Renew {
                    spec(transitions, old.acquire_time)
                } else {
                    spec(transitions + 1, None)
                });
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(drop)
            }
            (_, None) => unreachable!("decide() returns Create when there is no lease"),
        };
        match result {
            Ok(()) => Ok(true),
            // Another candidate wrote first: it leads.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err("write")(e)),
        }
    }

    /// Gives the Lease up on shutdown so a standby takes over at once instead of after expiry.
    pub async fn release(&self) -> Result<(), Error> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.err("get"))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.holder) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(drop)
            .map_err(self.err("release"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64) -> Lease {
        let now = Timestamp::from_second(1_000_000).unwrap();
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions_follow_holder_and_expiry() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 3)), "a", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 3)), "a", now),
            Decision::Wait,
            "live holder keeps it"
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 16)), "a", now),
            Decision::TakeOver,
            "expired holder loses it"
        );
        assert_eq!(
            decide(Some(&lease(None, 3)), "a", now),
            Decision::TakeOver,
            "released lease is free"
        );
    }
}
