//! Resource locks in the `<ns>_locks` KV bucket, so that stateless workers can lock the
//! resources a task touches (a repository, a database, a deploy target) before running it.
//!
//! One key per resource ([`lock_key`] escapes the name); its value is a JSON [`LockState`]:
//! the live holders (one exclusive, or any number of shared) and a FIFO queue of waiters.
//!
//! - **Expiry lives in the value.** nats-server 2.9 has no per-key TTL, and async-nats' TTL
//!   helpers lose the TTL when a key is re-created. Every holder and waiter carries
//!   `expires_at_ms` (wall clock); expired entries are ignored by readers and pruned by
//!   whoever writes the key next. Holders keep their lock with [`LockManager::renew`].
//! - **Keys are never deleted.** Releasing writes the state with the holder removed. A create
//!   over a delete marker costs three round trips, and an update by revision works on any
//!   existing entry, so keeping the key makes every later acquire one read and one write.
//! - **Every write is a revision compare-and-set** (`create` when the key is absent, `update`
//!   with the revision read otherwise); on a conflict the state is read again and the decision
//!   made again, so two contenders can never both be granted from the same state.
//! - **Fencing by revision.** The KV revision of the write that granted a lock is returned as
//!   the fencing token ([`HeldLock::revision`]). Revisions only grow, so a later grant always has
//!   a larger token: whatever the lock protects should reject work fenced by an older token,
//!   because expiry is judged on clocks and may fire late or early by a few hundred
//!   milliseconds. Correctness must come from the token, never from timing.
//! - **Fair waiters.** A contender that finds the lock busy joins `waiters` (ordered by
//!   `since_ms`). While anyone waits, only the head of the queue may take the lock — or, when
//!   the head wants it shared, the run of shared waiters at the head — so a steady stream of
//!   shared readers cannot starve a writer and a late-comer cannot overtake. A waiter entry
//!   expires after one lease unless the waiter polls again, so a crashed waiter blocks the
//!   queue for at most one lease.
//! - **Canonical order.** [`LockManager::acquire_all`] takes a task's resources sorted by name,
//!   so two tasks with crossing resource sets cannot each hold what the other waits for; on
//!   giving up it releases everything it took and leaves the queues it joined.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use futures::TryStreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::BusError;
use crate::domain::RetryPolicy;

/// Longest resource name, in characters.
pub const MAX_RESOURCE_NAME_CHARS: usize = 200;

/// How often one operation re-reads and retries after losing a compare-and-set race.
const MAX_CONFLICTS: u32 = 10;

/// Backoff between polls of a busy lock in [`LockManager::acquire_all`].
const POLL: RetryPolicy = RetryPolicy {
    base_delay: Duration::from_millis(20),
    max_delay: Duration::from_millis(500),
};

pub use crate::protocol::locks::LockMode;
use crate::protocol::locks::{Holder, LockState, Waiter};

/// A resource a task needs, as named in the task's definition.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct ResourceRequest {
    /// The resource name (see [`validate_resource_name`]).
    pub name: String,
    /// How to lock it; exclusive when left out.
    #[serde(default)]
    pub mode: LockMode,
}

impl ResourceRequest {
    /// An exclusive request for `name`.
    pub fn exclusive(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            mode: LockMode::Exclusive,
        }
    }

    /// A shared request for `name`.
    pub fn shared(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            mode: LockMode::Shared,
        }
    }
}

/// Checks a resource name: 1 to [`MAX_RESOURCE_NAME_CHARS`] characters, none of them
/// whitespace or control characters.
pub fn validate_resource_name(name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err("resource name is empty".into());
    }
    if chars > MAX_RESOURCE_NAME_CHARS {
        return Err(format!(
            "resource name has {chars} characters; at most {MAX_RESOURCE_NAME_CHARS} are allowed"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "resource name contains whitespace or a control character ({c:?})"
        ));
    }
    Ok(())
}

/// Whether `b` may stand for itself in a key (valid KV key bytes are `[-/_=.a-zA-Z0-9]`;
/// `=` is the escape character, so it is escaped too).
fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'.')
}

/// The KV key of the lock on resource `name`: bytes in `[-/_.a-zA-Z0-9]` are kept, every
/// other byte (including `=`) becomes `=XX` in uppercase hex, e.g. `repo:api` → `repo=3Aapi`.
/// A `.` or `/` at the start or end, and a `.` right after another `.`, are escaped too: keys
/// are subject tokens, and servers reject empty tokens and leading or trailing separators.
pub fn lock_key(name: &str) -> String {
    let bytes = name.as_bytes();
    let last = bytes.len().saturating_sub(1);
    let mut key = String::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        let at_edge = i == 0 || i == last;
        let escape = !plain_byte(b)
            || (matches!(b, b'.' | b'/') && at_edge)
            || (b == b'.' && i > 0 && bytes[i - 1] == b'.');
        if escape {
            key.push_str(&format!("={b:02X}"));
        } else {
            key.push(char::from(b));
        }
    }
    key
}

/// The resource name of a lock key: the inverse of [`lock_key`]. `None` when `key` is not
/// exactly what [`lock_key`] makes of some name.
pub fn lock_name(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'=' {
            let hex = key.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|h| h.is_ascii_digit() || h.is_ascii_uppercase())
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if plain_byte(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let name = String::from_utf8(out).ok()?;
    (lock_key(&name) == key).then_some(name)
}

impl LockState {
    /// Holders whose hold has not lapsed at `now_ms`.
    pub fn live_holders(&self, now_ms: i64) -> impl Iterator<Item = &Holder> {
        self.holders
            .iter()
            .filter(move |h| h.expires_at_ms > now_ms)
    }

    /// Waiters whose entry has not lapsed at `now_ms`.
    pub fn live_waiters(&self, now_ms: i64) -> impl Iterator<Item = &Waiter> {
        self.waiters
            .iter()
            .filter(move |w| w.expires_at_ms > now_ms)
    }

    /// Whether anyone holds or waits for the lock at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.live_holders(now_ms).next().is_some() || self.live_waiters(now_ms).next().is_some()
    }

    /// Drops lapsed holders and waiters (keeping `keep`'s hold even if lapsed), puts the
    /// queue in order and clears the mode of an empty lock. Returns whether anything changed.
    fn prune(&mut self, now_ms: i64, keep: Option<&str>) -> bool {
        let before = self.clone();
        self.holders
            .retain(|h| h.expires_at_ms > now_ms || Some(h.owner.as_str()) == keep);
        self.waiters.retain(|w| w.expires_at_ms > now_ms);
        self.waiters.sort_by_key(|w| w.since_ms);
        if self.holders.is_empty() {
            self.mode = None;
        }
        *self != before
    }

    /// Removes `owner`'s hold and queue entry. Returns whether it had either.
    fn remove_owner(&mut self, owner: &str) -> bool {
        let before = (self.holders.len(), self.waiters.len());
        self.holders.retain(|h| h.owner != owner);
        self.waiters.retain(|w| w.owner != owner);
        if self.holders.is_empty() {
            self.mode = None;
        }
        before != (self.holders.len(), self.waiters.len())
    }
}

/// What [`plan_acquire`] decided for one read state.
#[derive(Debug, PartialEq)]
struct Plan {
    /// The state to write, when it changed.
    write: Option<LockState>,
    /// Whether the write (or, without a write, the state as read) grants the lock.
    granted: bool,
    /// The contender's 0-based place in the queue when not granted.
    position: usize,
    /// Live holders when not granted.
    holders: Vec<Holder>,
}

/// The pure decision of [`LockManager::try_acquire`] on one read state.
fn plan_acquire(
    mut state: LockState,
    now_ms: i64,
    lease_ms: i64,
    mode: LockMode,
    owner: &str,
    agent_id: Option<&str>,
) -> Plan {
    let mut dirty = state.prune(now_ms, None);
    let expires_at_ms = now_ms.saturating_add(lease_ms);

    // Re-acquiring by a current holder renews the hold.
    if let Some(i) = state.holders.iter().position(|h| h.owner == owner) {
        let upgrade = mode == LockMode::Exclusive && state.mode == Some(LockMode::Shared);
        if upgrade && state.holders.len() > 1 {
            // Not queued: two shared holders both queueing to upgrade would wait for each
            // other forever.
            let holders = state.holders.clone();
            return Plan {
                write: dirty.then_some(state),
                granted: false,
                position: 0,
                holders,
            };
        }
        let holder = &mut state.holders[i];
        holder.expires_at_ms = expires_at_ms;
        if let Some(agent) = agent_id {
            holder.agent_id = Some(agent.to_string());
        }
        if upgrade {
            state.mode = Some(LockMode::Exclusive);
        }
        state.waiters.retain(|w| w.owner != owner);
        return Plan {
            write: Some(state),
            granted: true,
            position: 0,
            holders: Vec::new(),
        };
    }

    // Join the queue, or refresh the place already in it.
    let index = match state.waiters.iter().position(|w| w.owner == owner) {
        Some(i) => {
            let waiter = &mut state.waiters[i];
            if waiter.mode != mode {
                waiter.mode = mode;
                dirty = true;
            }
            // Refreshing only past half the lease saves writes (every write makes the holder's
            // next compare-and-set retry) while a waiter that keeps polling never lapses.
            if waiter.expires_at_ms.saturating_sub(now_ms) < lease_ms / 2 {
                waiter.expires_at_ms = expires_at_ms;
                dirty = true;
            }
            i
        }
        None => {
            // Never before the tail, whatever this process' clock says: FIFO is arrival order.
            let since_ms = state
                .waiters
                .last()
                .map_or(now_ms, |w| w.since_ms.max(now_ms));
            state.waiters.push(Waiter {
                owner: owner.to_string(),
                mode,
                since_ms,
                expires_at_ms,
            });
            dirty = true;
            state.waiters.len() - 1
        }
    };

    let first_in_line = index == 0
        || (mode == LockMode::Shared
            && state.waiters[..index]
                .iter()
                .all(|w| w.mode == LockMode::Shared));
    let compatible = state.holders.is_empty()
        || (mode == LockMode::Shared && state.mode == Some(LockMode::Shared));
    if first_in_line && compatible {
        state.waiters.remove(index);
        state.holders.push(Holder {
            owner: owner.to_string(),
            agent_id: agent_id.map(str::to_string),
            acquired_at_ms: now_ms,
            expires_at_ms,
        });
        state.mode = Some(mode);
        return Plan {
            write: Some(state),
            granted: true,
            position: 0,
            holders: Vec::new(),
        };
    }
    let holders = state.holders.clone();
    Plan {
        write: dirty.then_some(state),
        granted: false,
        position: index,
        holders,
    }
}

/// The answer of [`LockManager::try_acquire`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Acquire {
    /// Granted (or renewed). `revision` is the KV revision of the granting write: the fencing
    /// token.
    Acquired { revision: u64 },
    /// Held by others or others are first in line; the caller is queued at `position`
    /// (0-based) and should poll again within one lease to keep its place.
    Busy {
        holders: Vec<Holder>,
        position: usize,
    },
}

/// One lock taken by [`LockManager::acquire_all`].
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct HeldLock {
    /// The resource name.
    pub name: String,
    /// The mode it is held in.
    pub mode: LockMode,
    /// The fencing token: the KV revision of the write that granted it.
    pub revision: u64,
}

/// The answer of [`LockManager::acquire_all`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AcquireAll {
    /// Every resource is held, in canonical (name) order.
    Acquired(Vec<HeldLock>),
    /// `resource` stayed busy for `waited`; nothing is held and no queue entry is left.
    Blocked { resource: String, waited: Duration },
}

/// Locks resources in the `<ns>_locks` bucket on behalf of owners.
#[derive(Clone, Debug)]
pub struct LockManager {
    kv: kv::Store,
    lease: Duration,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The state of one key as read: its decoded value (or why it could not be decoded) and the
/// revision to compare-and-set against (`None`: no entry at all, so create).
struct Current {
    state: Result<LockState, serde_json::Error>,
    revision: Option<u64>,
}

impl LockManager {
    /// A manager over the locks bucket `kv` (open it with
    /// `provision::open_bucket(&js, &names, names::BUCKET_LOCKS)`), granting holds and queue
    /// places of `lease` each.
    pub fn new(kv: kv::Store, lease: Duration) -> Self {
        Self { kv, lease }
    }

    /// How long a hold or queue place lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    fn kv_err(&self, name: &str, e: impl std::fmt::Display) -> BusError {
        BusError::Kv {
            bucket: self.kv.name.clone(),
            reason: format!("lock {name}: {e}"),
        }
    }

    fn checked_key(&self, name: &str) -> Result<String, BusError> {
        validate_resource_name(name).map_err(|e| self.kv_err(name, e))?;
        Ok(lock_key(name))
    }

    async fn read(&self, key: &str, name: &str) -> Result<Current, BusError> {
        let entry = self.kv.entry(key).await.map_err(|e| self.kv_err(name, e))?;
        Ok(match entry {
            None => Current {
                state: Ok(LockState::default()),
                revision: None,
            },
            // A delete or purge marker (never written by us): update over it by revision.
            Some(e) if e.operation != kv::Operation::Put => Current {
                state: Ok(LockState::default()),
                revision: Some(e.revision),
            },
            Some(e) => Current {
                state: serde_json::from_slice(&e.value),
                revision: Some(e.revision),
            },
        })
    }

    /// Writes `state` by compare-and-set. `Ok(None)`: someone wrote first.
    async fn write(
        &self,
        key: &str,
        name: &str,
        state: &LockState,
        revision: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        let value: bytes::Bytes = serde_json::to_vec(state)
            .map_err(|source| BusError::Encode {
                what: "lock state",
                source,
            })?
            .into();
        match revision {
            None => match self.kv.create(key, value).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(self.kv_err(name, e)),
            },
            Some(rev) => match self.kv.update(key, value, rev).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(self.kv_err(name, e)),
            },
        }
    }

    /// Read–decide–write with retries on conflict. `decide` gets the state as read (an
    /// unreadable value is an error unless `overwrite_unreadable`, when it reads as empty)
    /// and returns the state to write (if any) and its answer; the revision of the write, if
    /// one was made, is returned with the answer.
    async fn modify<T>(
        &self,
        name: &str,
        overwrite_unreadable: bool,
        mut decide: impl FnMut(LockState, i64) -> Result<(Option<LockState>, T), BusError>,
    ) -> Result<(T, Option<u64>), BusError> {
        let key = self.checked_key(name)?;
        for attempt in 0..MAX_CONFLICTS {
            if attempt > 0 {
                // Contenders that collided re-read at slightly different times.
                let jitter = rand::rng().random_range(0..=2 * u64::from(attempt));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let current = self.read(&key, name).await?;
            let state = match current.state {
                Ok(state) => state,
                Err(_) if overwrite_unreadable => LockState::default(),
                Err(e) => {
                    return Err(self.kv_err(
                        name,
                        format!(
                            "unreadable lock value ({e}); an operator can clear it with a force release"
                        ),
                    ));
                }
            };
            let (next, answer) = decide(state, now_ms())?;
            let Some(next) = next else {
                return Ok((answer, None));
            };
            if let Some(rev) = self.write(&key, name, &next, current.revision).await? {
                return Ok((answer, Some(rev)));
            }
        }
        Err(self.kv_err(
            name,
            format!("gave up after {MAX_CONFLICTS} conflicting writes"),
        ))
    }

    /// Tries once to lock `name` in `mode` for `owner`. Granted when the mode is compatible
    /// with the live holders (exclusive: none; shared: only shared ones) and nobody is ahead
    /// in the queue; otherwise `owner` is queued (or its place refreshed) and gets
    /// [`Acquire::Busy`]. A current holder re-acquiring just renews its hold; a shared holder
    /// asking for exclusive is upgraded only when it is the sole holder (otherwise `Busy` at
    /// position 0, not queued).
    pub async fn try_acquire(
        &self,
        name: &str,
        mode: LockMode,
        owner: &str,
        agent_id: Option<&str>,
    ) -> Result<Acquire, BusError> {
        let lease_ms = self.lease_ms();
        let (plan, revision) = self
            .modify(name, false, |state, now| {
                let mut plan = plan_acquire(state, now, lease_ms, mode, owner, agent_id);
                Ok((plan.write.take(), plan))
            })
            .await?;
        match (plan.granted, revision) {
            (true, Some(revision)) => Ok(Acquire::Acquired { revision }),
            // A grant is always a write; kept total rather than trusting that here.
            (true, None) => Err(self.kv_err(name, "grant was not written")),
            (false, _) => Ok(Acquire::Busy {
                holders: plan.holders,
                position: plan.position,
            }),
        }
    }

    /// Locks every resource of `resources` for `owner`, in canonical order (sorted by name,
    /// duplicates merged, exclusive winning), polling a busy one with jittered exponential
    /// backoff and keeping the ones already taken renewed. After `max_wait` in total it
    /// releases what it took, leaves the queues it joined and answers
    /// [`AcquireAll::Blocked`]. The wait is recorded as `omoi_lock_wait_seconds`.
    #[tracing::instrument(skip(self, resources, agent_id, max_wait), fields(resources = resources.len()))]
    pub async fn acquire_all(
        &self,
        resources: &[ResourceRequest],
        owner: &str,
        agent_id: Option<&str>,
        max_wait: Duration,
    ) -> Result<AcquireAll, BusError> {
        let mut wanted: BTreeMap<&str, LockMode> = BTreeMap::new();
        for r in resources {
            validate_resource_name(&r.name).map_err(|e| self.kv_err(&r.name, e))?;
            let mode = wanted.entry(r.name.as_str()).or_insert(r.mode);
            if r.mode == LockMode::Exclusive {
                *mode = LockMode::Exclusive;
            }
        }
        let started = Instant::now();
        let mut held: Vec<HeldLock> = Vec::with_capacity(wanted.len());
        let mut renewed_at = Instant::now();
        for (name, mode) in wanted {
            let mut polls = 0u32;
            loop {
                let answer = match self.try_acquire(name, mode, owner, agent_id).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        self.abandon(&held, name, owner).await;
                        return Err(e);
                    }
                };
                if let Acquire::Acquired { revision } = answer {
                    held.push(HeldLock {
                        name: name.to_string(),
                        mode,
                        revision,
                    });
                    break;
                }
                let waited = started.elapsed();
                if waited >= max_wait {
                    self.abandon(&held, name, owner).await;
                    metrics::histogram!("omoi_lock_wait_seconds").record(waited.as_secs_f64());
                    tracing::debug!(
                        owner,
                        resource = name,
                        waited_ms = waited.as_millis() as u64,
                        "resource stayed busy; gave up"
                    );
                    return Ok(AcquireAll::Blocked {
                        resource: name.to_string(),
                        waited,
                    });
                }
                polls = polls.saturating_add(1);
                // Poll at least three times per lease, or the queue place lapses.
                let delay = POLL
                    .delay(polls, &mut rand::rng())
                    .min(self.lease / 3)
                    .min(max_wait - waited);
                tokio::time::sleep(delay).await;
                if !held.is_empty() && renewed_at.elapsed() >= self.lease / 3 {
                    if let Err(e) = self.renew(&held, owner).await {
                        self.abandon(&held, name, owner).await;
                        return Err(e);
                    }
                    renewed_at = Instant::now();
                }
            }
        }
        metrics::histogram!("omoi_lock_wait_seconds").record(started.elapsed().as_secs_f64());
        Ok(AcquireAll::Acquired(held))
    }

    /// Best-effort clean-up of a failed [`Self::acquire_all`]: release `held`, leave the
    /// queue of `waiting_on`. Failures are logged here; the entries lapse after a lease anyway.
    async fn abandon(&self, held: &[HeldLock], waiting_on: &str, owner: &str) {
        for name in held.iter().map(|h| h.name.as_str()).chain([waiting_on]) {
            if let Err(e) = self.withdraw(name, owner).await {
                tracing::warn!(error = %e, owner, resource = name, "could not release lock; it will lapse after its lease");
            }
        }
    }

    /// Pushes the expiry of each of `owner`'s holds in `held` to now + lease. Fails with
    /// [`BusError::Kv`] when `owner` no longer holds one of them (its hold lapsed and was
    /// pruned, or taken over, or force-released): the work it protects must stop, since its
    /// fencing token is stale. A lapsed hold that nobody has pruned yet is renewed: nobody can
    /// have been granted the lock in between, since that write would have pruned it.
    pub async fn renew(&self, held: &[HeldLock], owner: &str) -> Result<(), BusError> {
        let lease_ms = self.lease_ms();
        for lock in held {
            let (holds, _) = self
                .modify(&lock.name, false, |mut state, now| {
                    state.prune(now, Some(owner));
                    let Some(holder) = state.holders.iter_mut().find(|h| h.owner == owner) else {
                        return Ok((None, false));
                    };
                    holder.expires_at_ms = now.saturating_add(lease_ms);
                    Ok((Some(state), true))
                })
                .await?;
            if !holds {
                return Err(self.kv_err(
                    &lock.name,
                    format!(
                        "lock lost: {owner} no longer holds it (fencing token {} is stale)",
                        lock.revision
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Releases each of `owner`'s holds in `held` and withdraws `owner` from their queues.
    /// Idempotent: releasing what is not held is a no-op.
    pub async fn release_all(&self, held: &[HeldLock], owner: &str) -> Result<(), BusError> {
        for lock in held {
            self.withdraw(&lock.name, owner).await?;
        }
        Ok(())
    }

    /// Removes `owner` from lock `name`: its hold, if any, and its queue place, if any.
    /// Idempotent. Callers of [`Self::try_acquire`] that stop waiting use this to leave the
    /// queue at once rather than blocking it until their place lapses.
    pub async fn withdraw(&self, name: &str, owner: &str) -> Result<(), BusError> {
        self.modify(name, false, |mut state, now| {
            if !state.remove_owner(owner) {
                return Ok((None, ()));
            }
            state.prune(now, None);
            Ok((Some(state), ()))
        })
        .await?;
        Ok(())
    }

    /// Every lock with at least one live holder or waiter, by resource name, with lapsed
    /// entries left out.
    pub async fn list(&self) -> Result<Vec<(String, LockState)>, BusError> {
        let bucket_err = |e: &dyn std::fmt::Display| BusError::Kv {
            bucket: self.kv.name.clone(),
            reason: format!("list keys: {e}"),
        };
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| bucket_err(&e))?
            .try_collect()
            .await
            .map_err(|e| bucket_err(&e))?;
        let now = now_ms();
        let mut locks = Vec::new();
        for key in keys {
            let Some(name) = lock_name(&key) else {
                tracing::debug!(key, "skipping a key that is not a lock key");
                continue;
            };
            let current = self.read(&key, &name).await?;
            let mut state = match current.state {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(resource = name, error = %e, "unreadable lock value");
                    continue;
                }
            };
            state.prune(now, None);
            if state.is_live(now) {
                locks.push((name, state));
            }
        }
        locks.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(locks)
    }

    /// Operator action: drops every holder of `name`, keeping the queue (its head is granted
    /// on its next poll). Returns whether anyone live held it. An unreadable value is replaced
    /// by an empty lock. The former holders' next [`Self::renew`] fails.
    pub async fn force_release(&self, name: &str) -> Result<bool, BusError> {
        let (held, _) = self
            .modify(name, true, |mut state, now| {
                let held = state.live_holders(now).next().is_some();
                if state.holders.is_empty() && state.mode.is_none() {
                    return Ok((None, held));
                }
                state.holders.clear();
                state.prune(now, None);
                Ok((Some(state), held))
            })
            .await?;
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_escape_what_kv_keys_cannot_hold_and_round_trip() {
        assert_eq!(lock_key("repo:api"), "repo=3Aapi");
        assert_eq!(lock_key("a=b"), "a=3Db");
        assert_eq!(lock_key("db/main.users"), "db/main.users");
        assert_eq!(lock_key(".hidden"), "=2Ehidden");
        assert_eq!(lock_key("dir/"), "dir=2F");
        assert_eq!(lock_key("/abs"), "=2Fabs");
        assert_eq!(lock_key("a..b"), "a.=2Eb");
        assert_eq!(lock_key("."), "=2E");
        assert_eq!(lock_key("é"), "=C3=A9");
        for name in [
            "repo:api",
            "a=b",
            "x",
            ".",
            "..",
            "...",
            "/",
            "a/b/",
            ".a.",
            "a..b",
            "a...b",
            "deploy:prod/eu-west-1",
            "数据库",
            "*>$%",
            "=41",
            "ÿ",
        ] {
            let key = lock_key(name);
            assert!(
                !key.is_empty()
                    && key.bytes().all(|b| plain_byte(b) || b == b'=')
                    && !key.starts_with(['.', '/'])
                    && !key.ends_with(['.', '/'])
                    && !key.contains(".."),
                "{name:?} → {key:?}"
            );
            assert_eq!(lock_name(&key).as_deref(), Some(name), "{key}");
        }
    }

    #[test]
    fn lock_name_rejects_keys_lock_key_would_not_make() {
        for key in [
            "=41", "a=3", "a=zz", "a=3a", "=C3", "a b", ".a", "a..b", "=FF",
        ] {
            assert_eq!(lock_name(key), None, "{key}");
        }
    }

    #[test]
    fn resource_names_are_short_and_printable() {
        assert!(validate_resource_name("repo:api").is_ok());
        assert!(validate_resource_name(&"x".repeat(200)).is_ok());
        assert!(validate_resource_name(&"é".repeat(200)).is_ok());
        assert!(validate_resource_name(&"x".repeat(201)).is_err());
        assert!(validate_resource_name("").is_err());
        assert!(validate_resource_name("a b").is_err());
        assert!(validate_resource_name("a\tb").is_err());
        assert!(validate_resource_name("a\u{7}b").is_err());
    }

    #[test]
    fn a_request_without_a_mode_is_exclusive() {
        let r: ResourceRequest = serde_json::from_str(r#"{"name":"x"}"#).unwrap();
        assert_eq!(r, ResourceRequest::exclusive("x"));
        let r: ResourceRequest = serde_json::from_str(r#"{"name":"x","mode":"shared"}"#).unwrap();
        assert_eq!(r.mode, LockMode::Shared);
    }

    const LEASE: i64 = 1_000;

    /// Applies one try_acquire decision, as if the write succeeded.
    fn step(state: &mut LockState, now: i64, mode: LockMode, owner: &str) -> Option<usize> {
        let plan = plan_acquire(state.clone(), now, LEASE, mode, owner, None);
        if let Some(next) = plan.write {
            *state = next;
        }
        (!plan.granted).then_some(plan.position)
    }

    use LockMode::{Exclusive, Shared};

    #[test]
    fn exclusive_excludes_everyone_and_a_holder_renews() {
        let mut s = LockState::default();
        assert_eq!(step(&mut s, 0, Exclusive, "a"), None);
        assert_eq!(step(&mut s, 1, Exclusive, "b"), Some(0));
        assert_eq!(step(&mut s, 2, Shared, "c"), Some(1));
        assert_eq!(step(&mut s, 600, Exclusive, "a"), None);
        assert_eq!(s.holders[0].expires_at_ms, 1_600);
        assert_eq!(s.holders.len(), 1);
    }

    #[test]
    fn shared_holders_coexist_until_an_exclusive_waiter_queues() {
        let mut s = LockState::default();
        assert_eq!(step(&mut s, 0, Shared, "a"), None);
        assert_eq!(step(&mut s, 0, Shared, "b"), None);
        assert_eq!(step(&mut s, 0, Exclusive, "w"), Some(0));
        // A late reader queues behind the writer instead of starving it.
        assert_eq!(step(&mut s, 0, Shared, "c"), Some(1));
        s.remove_owner("a");
        s.remove_owner("b");
        assert_eq!(step(&mut s, 1, Shared, "c"), Some(1));
        assert_eq!(step(&mut s, 1, Exclusive, "w"), None);
        assert_eq!(step(&mut s, 2, Shared, "c"), Some(0));
    }

    #[test]
    fn a_run_of_shared_waiters_at_the_head_is_let_in_together() {
        let mut s = LockState::default();
        assert_eq!(step(&mut s, 0, Exclusive, "x"), None);
        assert_eq!(step(&mut s, 1, Shared, "a"), Some(0));
        assert_eq!(step(&mut s, 2, Shared, "b"), Some(1));
        assert_eq!(step(&mut s, 3, Exclusive, "w"), Some(2));
        assert_eq!(step(&mut s, 4, Shared, "c"), Some(3));
        s.remove_owner("x");
        // b may go before a polls; c may not pass the writer.
        assert_eq!(step(&mut s, 5, Shared, "b"), None);
        assert_eq!(step(&mut s, 5, Shared, "c"), Some(2));
        assert_eq!(step(&mut s, 5, Shared, "a"), None);
        assert_eq!(step(&mut s, 5, Exclusive, "w"), Some(0));
    }

    #[test]
    fn waiters_are_served_in_arrival_order_and_lapse() {
        let mut s = LockState::default();
        assert_eq!(step(&mut s, 0, Exclusive, "a"), None);
        assert_eq!(step(&mut s, 10, Exclusive, "b"), Some(0));
        // c's clock runs behind: it still queues after b.
        assert_eq!(step(&mut s, 5, Exclusive, "c"), Some(1));
        s.remove_owner("a");
        assert_eq!(step(&mut s, 20, Exclusive, "c"), Some(1));
        assert_eq!(step(&mut s, 20, Exclusive, "b"), None);
        // b's hold lapses without renewal: c takes over.
        assert_eq!(step(&mut s, 1_021, Exclusive, "c"), None);
        assert_eq!(s.holders.len(), 1);
        assert_eq!(s.holders[0].owner, "c");
    }

    #[test]
    fn a_polling_waiter_writes_only_when_its_place_needs_refreshing() {
        let mut s = LockState::default();
        step(&mut s, 0, Exclusive, "a");
        step(&mut s, 0, Exclusive, "b");
        let plan = plan_acquire(s.clone(), 100, LEASE, Exclusive, "b", None);
        assert!(plan.write.is_none() && !plan.granted);
        let plan = plan_acquire(s.clone(), 600, LEASE, Exclusive, "b", None);
        assert_eq!(plan.write.map(|w| w.waiters[0].expires_at_ms), Some(1_600));
    }

    #[test]
    fn a_sole_shared_holder_upgrades_but_not_past_another_holder() {
        let mut s = LockState::default();
        step(&mut s, 0, Shared, "a");
        assert_eq!(step(&mut s, 0, Exclusive, "a"), None);
        assert_eq!(s.mode, Some(Exclusive));
        let mut s = LockState::default();
        step(&mut s, 0, Shared, "a");
        step(&mut s, 0, Shared, "b");
        assert_eq!(step(&mut s, 0, Exclusive, "a"), Some(0));
        assert!(s.waiters.is_empty());
    }
}
