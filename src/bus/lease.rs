//! A lease in a JetStream KV bucket: at most one holder at a time, taken over by a standby
//! once the holder stops renewing. Every write is a revision compare-and-set, so two
//! contenders can never both believe they won the same revision.
//!
//! Expiry is kept in the value (nats-server 2.9 has no per-key TTL), as wall-clock
//! milliseconds; holders and contenders are assumed to have clocks within a fraction of the
//! lease time of each other.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::BusError;

/// The value stored under the lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    pub holder: String,
    pub expires_at_ms: i64,
}

/// One contender for one lease key.
pub struct Lease {
    kv: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
    revision: Option<u64>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Lease {
    pub fn new(kv: kv::Store, key: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            kv,
            key: key.to_string(),
            holder: holder.to_string(),
            ttl,
            revision: None,
        }
    }

    fn value(&self, expires_at_ms: i64) -> Result<bytes::Bytes, BusError> {
        serde_json::to_vec(&LeaseValue {
            holder: self.holder.clone(),
            expires_at_ms,
        })
        .map(Into::into)
        .map_err(|source| BusError::Encode {
            what: "lease",
            source,
        })
    }

    fn kv_err(&self, e: impl std::fmt::Display) -> BusError {
        BusError::Kv {
            bucket: self.kv.name.clone(),
            reason: format!("lease {}: {e}", self.key),
        }
    }

    /// Acquires or renews the lease. `Ok(true)` while this contender holds it.
    pub async fn try_acquire(&mut self) -> Result<bool, BusError> {
        let value = self.value(now_ms() + self.ttl.as_millis() as i64)?;
        // Renewal of a revision we wrote ourselves: one round trip.
        if let Some(rev) = self.revision {
            match self.kv.update(&self.key, value.clone(), rev).await {
                Ok(new_rev) => {
                    self.revision = Some(new_rev);
                    return Ok(true);
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => self.revision = None,
                Err(e) => {
                    self.revision = None;
                    return Err(self.kv_err(e));
                }
            }
        }
        let entry = self.kv.entry(&self.key).await.map_err(|e| self.kv_err(e))?;
        let current = entry.filter(|e| e.operation == kv::Operation::Put);
        let result = match current {
            None => match self.kv.create(&self.key, value).await {
                Ok(rev) => Some(rev),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => None,
                Err(e) => return Err(self.kv_err(e)),
            },
            Some(entry) => {
                let held: Option<LeaseValue> = serde_json::from_slice(&entry.value).ok();
                let free = match &held {
                    Some(v) => v.holder == self.holder || v.expires_at_ms <= now_ms(),
                    None => true, // unreadable value: treat as expired rather than wedge forever
                };
                if !free {
                    return Ok(false);
                }
                match self.kv.update(&self.key, value, entry.revision).await {
                    Ok(rev) => Some(rev),
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => None,
                    Err(e) => return Err(self.kv_err(e)),
                }
            }
        };
        self.revision = result;
        Ok(result.is_some())
    }

    /// Gives the lease up at once (so a standby need not wait for expiry).
    pub async fn release(&mut self) -> Result<(), BusError> {
        if let Some(rev) = self.revision.take() {
            let value = self.value(0)?;
            match self.kv.update(&self.key, value, rev).await {
                Ok(_) => {}
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(self.kv_err(e)),
            }
        }
        Ok(())
    }

    /// Contends for the lease until `cancel`, renewing at a third of the TTL, and reports
    /// leadership on `leader`. Releases the lease on the way out.
    pub async fn run(mut self, leader: watch::Sender<bool>, cancel: CancellationToken) {
        let period = self.ttl / 3;
        loop {
            let held = match self.try_acquire().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed; stepping down");
                    false
                }
            };
            leader.send_if_modified(|was| {
                let changed = *was != held;
                if changed {
                    tracing::info!(holder = %self.holder, leader = held, "leadership changed");
                }
                *was = held;
                changed
            });
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
        }
        leader.send_replace(false);
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "could not release lease; it will expire");
        }
    }
}
