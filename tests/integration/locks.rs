//! Resource locks in the KV bucket: mutual exclusion under races, shared holders, takeover of
//! a lapsed hold, FIFO queues, deadlock-free multi-resource acquisition, give-up, listing and
//! operator release.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use omoi::bus::BusError;
use omoi::bus::kv_lock::{Acquire, AcquireAll, HeldLock, LockManager, ResourceRequest, lock_key};
use omoi::bus::names::BUCKET_LOCKS;
use omoi::bus::provision;
use omoi::protocol::locks::LockMode;

use crate::env::TestEnv;

async fn manager(env: &TestEnv, lease: Duration) -> LockManager {
    let kv = provision::open_bucket(&env.js, &env.names, BUCKET_LOCKS)
        .await
        .unwrap();
    LockManager::new(kv, lease)
}

fn held(name: &str, mode: LockMode, revision: u64) -> HeldLock {
    HeldLock {
        name: name.into(),
        mode,
        revision,
    }
}

fn revision(a: &Acquire) -> u64 {
    match a {
        Acquire::Acquired { revision } => *revision,
        Acquire::Busy { holders, position } => {
            panic!("expected a grant, got busy at {position} behind {holders:?}")
        }
    }
}

fn position(a: &Acquire) -> usize {
    match a {
        Acquire::Busy { position, .. } => *position,
        Acquire::Acquired { revision } => panic!("expected busy, got a grant at {revision}"),
    }
}

#[tokio::test]
async fn two_owners_never_both_hold_an_exclusive_lock() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(10)).await;
    for round in 0..20 {
        // A race on a key that does not exist yet (create) and on one that does (update).
        let name = format!("race:{round}");
        for phase in ["create", "update"] {
            if phase == "update" {
                let setup = locks
                    .try_acquire(&name, LockMode::Exclusive, "setup", None)
                    .await
                    .unwrap();
                locks
                    .release_all(
                        &[held(&name, LockMode::Exclusive, revision(&setup))],
                        "setup",
                    )
                    .await
                    .unwrap();
            }
            let contenders = (0..5).map(|i| {
                let locks = locks.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let owner = format!("{phase}-{i}");
                    let answer = locks
                        .try_acquire(&name, LockMode::Exclusive, &owner, None)
                        .await
                        .unwrap();
                    (owner, answer)
                })
            });
            let answers: Vec<(String, Acquire)> =
                futures::future::try_join_all(contenders).await.unwrap();
            let winners: Vec<&String> = answers
                .iter()
                .filter(|(_, a)| matches!(a, Acquire::Acquired { .. }))
                .map(|(o, _)| o)
                .collect();
            assert_eq!(winners.len(), 1, "round {round} {phase}: {answers:?}");
            let mut positions: Vec<usize> = answers
                .iter()
                .filter_map(|(_, a)| match a {
                    Acquire::Busy { holders, position } => {
                        assert_eq!(holders.len(), 1);
                        assert_eq!(&holders[0].owner, winners[0]);
                        Some(*position)
                    }
                    Acquire::Acquired { .. } => None,
                })
                .collect();
            positions.sort_unstable();
            assert_eq!(positions, vec![0, 1, 2, 3], "every loser has its own place");
            // Clear the lock and its queue for the next phase.
            for (owner, _) in &answers {
                locks.withdraw(&name, owner).await.unwrap();
            }
        }
    }
    assert!(locks.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn shared_holders_coexist_and_exclude_an_exclusive_one() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(10)).await;
    let a = locks
        .try_acquire("dataset", LockMode::Shared, "a", Some("agent-a"))
        .await
        .unwrap();
    let b = locks
        .try_acquire("dataset", LockMode::Shared, "b", None)
        .await
        .unwrap();
    assert!(revision(&b) > revision(&a));
    let writer = locks
        .try_acquire("dataset", LockMode::Exclusive, "w", None)
        .await
        .unwrap();
    match &writer {
        Acquire::Busy { holders, position } => {
            assert_eq!(*position, 0);
            let owners: Vec<&str> = holders.iter().map(|h| h.owner.as_str()).collect();
            assert_eq!(owners, ["a", "b"]);
            assert_eq!(holders[0].agent_id.as_deref(), Some("agent-a"));
        }
        other => panic!("the writer got in beside readers: {other:?}"),
    }
    // A reader arriving after the queued writer waits behind it.
    let late = locks
        .try_acquire("dataset", LockMode::Shared, "c", None)
        .await
        .unwrap();
    assert_eq!(position(&late), 1);

    locks
        .release_all(&[held("dataset", LockMode::Shared, revision(&a))], "a")
        .await
        .unwrap();
    let writer = locks
        .try_acquire("dataset", LockMode::Exclusive, "w", None)
        .await
        .unwrap();
    assert_eq!(position(&writer), 0, "one reader is still in");
    locks
        .release_all(&[held("dataset", LockMode::Shared, revision(&b))], "b")
        .await
        .unwrap();
    let writer = locks
        .try_acquire("dataset", LockMode::Exclusive, "w", None)
        .await
        .unwrap();
    assert!(revision(&writer) > revision(&b));
    let late = locks
        .try_acquire("dataset", LockMode::Shared, "c", None)
        .await
        .unwrap();
    assert_eq!(position(&late), 0);
}

#[tokio::test]
async fn an_expired_holder_is_taken_over_by_a_waiter_and_its_renewal_then_fails() {
    let env = TestEnv::new().await;
    let lease = Duration::from_millis(300);
    let locks = manager(&env, lease).await;
    let old = locks
        .try_acquire("deploy:prod", LockMode::Exclusive, "old", None)
        .await
        .unwrap();
    let old_held = [held("deploy:prod", LockMode::Exclusive, revision(&old))];
    let waiting = locks
        .try_acquire("deploy:prod", LockMode::Exclusive, "new", None)
        .await
        .unwrap();
    assert_eq!(position(&waiting), 0);
    // Renewal within the lease works; then the old holder stops renewing (it died).
    locks.renew(&old_held, "old").await.unwrap();
    tokio::time::sleep(lease + Duration::from_millis(150)).await;
    let new = locks
        .try_acquire("deploy:prod", LockMode::Exclusive, "new", None)
        .await
        .unwrap();
    assert!(
        revision(&new) > revision(&old),
        "the fencing token of the new holder is larger"
    );
    let err = locks.renew(&old_held, "old").await.unwrap_err();
    assert!(
        matches!(&err, BusError::Kv { reason, .. } if reason.contains("lost")),
        "{err}"
    );
    // And it cannot simply take the lock back.
    let again = locks
        .try_acquire("deploy:prod", LockMode::Exclusive, "old", None)
        .await
        .unwrap();
    assert_eq!(position(&again), 0);
    locks
        .renew(
            &[held("deploy:prod", LockMode::Exclusive, revision(&new))],
            "new",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn waiters_are_served_first_come_first_served() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(10)).await;
    let a = locks
        .try_acquire("repo:api", LockMode::Exclusive, "a", None)
        .await
        .unwrap();
    let b = locks
        .try_acquire("repo:api", LockMode::Exclusive, "b", None)
        .await
        .unwrap();
    let c = locks
        .try_acquire("repo:api", LockMode::Exclusive, "c", None)
        .await
        .unwrap();
    assert_eq!((position(&b), position(&c)), (0, 1));
    locks
        .release_all(&[held("repo:api", LockMode::Exclusive, revision(&a))], "a")
        .await
        .unwrap();
    // C polls first, but B is ahead of it.
    let c = locks
        .try_acquire("repo:api", LockMode::Exclusive, "c", None)
        .await
        .unwrap();
    assert_eq!(position(&c), 1);
    // So is a newcomer, and a returning former holder.
    for owner in ["d", "a"] {
        let x = locks
            .try_acquire("repo:api", LockMode::Exclusive, owner, None)
            .await
            .unwrap();
        assert!(position(&x) >= 2, "{owner} jumped the queue: {x:?}");
    }
    let b = locks
        .try_acquire("repo:api", LockMode::Exclusive, "b", None)
        .await
        .unwrap();
    let c = locks
        .try_acquire("repo:api", LockMode::Exclusive, "c", None)
        .await
        .unwrap();
    assert_eq!(position(&c), 0);
    locks
        .release_all(&[held("repo:api", LockMode::Exclusive, revision(&b))], "b")
        .await
        .unwrap();
    let c = locks
        .try_acquire("repo:api", LockMode::Exclusive, "c", None)
        .await
        .unwrap();
    assert!(revision(&c) > revision(&b));
}

#[tokio::test]
async fn acquire_all_with_crossing_resource_sets_never_deadlocks_or_overlaps() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(5)).await;
    let inside = Arc::new(AtomicUsize::new(0));
    let rounds = 25;
    let tasks = [("task-1", ["x", "y"]), ("task-2", ["y", "x"])].map(|(task, order)| {
        let locks = locks.clone();
        let inside = inside.clone();
        tokio::spawn(async move {
            let wanted: Vec<ResourceRequest> = order
                .iter()
                .map(|n| ResourceRequest::exclusive(*n))
                .collect();
            let mut intervals = Vec::new();
            for round in 0..rounds {
                let owner = format!("{task}/{round}");
                let got = locks
                    .acquire_all(&wanted, &owner, None, Duration::from_secs(20))
                    .await
                    .unwrap();
                let AcquireAll::Acquired(held) = got else {
                    panic!("{owner} blocked: {got:?}");
                };
                let names: Vec<&str> = held.iter().map(|h| h.name.as_str()).collect();
                assert_eq!(names, ["x", "y"], "canonical order");
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await;
                let end = Instant::now();
                inside.fetch_sub(1, Ordering::SeqCst);
                intervals.push((start, end, held[0].revision, task));
                locks.release_all(&held, &owner).await.unwrap();
            }
            intervals
        })
    });
    let all = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::try_join_all(tasks),
    )
    .await
    .expect("deadlock: crossing acquire_all calls did not finish")
    .unwrap();
    let mut intervals: Vec<_> = all.into_iter().flatten().collect();
    assert_eq!(intervals.len(), 2 * rounds);
    intervals.sort_by_key(|i| i.0);
    for pair in intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "holds overlap: {pair:?}");
        assert!(
            pair[0].2 < pair[1].2,
            "fencing tokens grow with every grant"
        );
    }
    // The tasks really contended: fair queues make them take turns rather than one task
    // finishing all its rounds first.
    let turns = intervals.windows(2).filter(|p| p[0].3 != p[1].3).count();
    assert!(turns >= rounds, "only {turns} hand-overs between the tasks");
    assert!(
        locks.list().await.unwrap().is_empty(),
        "nothing left behind"
    );
}

#[tokio::test]
async fn acquire_all_gives_up_after_max_wait_and_leaves_nothing_of_its_own() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(10)).await;
    locks
        .try_acquire("y", LockMode::Exclusive, "holder", None)
        .await
        .unwrap();
    let max_wait = Duration::from_millis(400);
    let started = Instant::now();
    let got = locks
        .acquire_all(
            &[
                ResourceRequest::exclusive("y"),
                ResourceRequest::shared("x"),
                ResourceRequest::shared("y"),
            ],
            "impatient",
            Some("agent-1"),
            max_wait,
        )
        .await
        .unwrap();
    match got {
        AcquireAll::Blocked { resource, waited } => {
            assert_eq!(resource, "y");
            assert!(waited >= max_wait, "{waited:?}");
            assert!(started.elapsed() < max_wait + Duration::from_secs(2));
        }
        other => panic!("expected to give up, got {other:?}"),
    }
    let listed = locks.list().await.unwrap();
    assert_eq!(listed.len(), 1, "x was released: {listed:?}");
    let (name, state) = &listed[0];
    assert_eq!(name, "y");
    assert_eq!(state.holders.len(), 1);
    assert_eq!(state.holders[0].owner, "holder");
    assert!(state.waiters.is_empty(), "its queue place was withdrawn");
    // Nothing stands in anyone's way on x.
    let x = locks
        .try_acquire("x", LockMode::Exclusive, "other", None)
        .await
        .unwrap();
    revision(&x);
}

#[tokio::test]
async fn list_shows_live_locks_and_force_release_clears_holders_but_keeps_the_queue() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(10)).await;
    let odd_names = [".hidden", "a..b", "dir/", "数据", "x=y*>"];
    for name in odd_names {
        let got = locks
            .try_acquire(name, LockMode::Shared, "reader", None)
            .await
            .unwrap();
        locks
            .release_all(&[held(name, LockMode::Shared, revision(&got))], "reader")
            .await
            .unwrap();
    }
    let a = locks
        .try_acquire("repo:api", LockMode::Exclusive, "a", Some("agent-a"))
        .await
        .unwrap();
    assert_eq!(
        position(
            &locks
                .try_acquire("repo:api", LockMode::Exclusive, "b", None)
                .await
                .unwrap()
        ),
        0
    );
    locks
        .try_acquire("a..b", LockMode::Shared, "reader", None)
        .await
        .unwrap();

    let listed = locks.list().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a..b", "repo:api"], "released locks are not listed");
    let (_, api) = &listed[1];
    assert_eq!(api.mode, Some(LockMode::Exclusive));
    assert_eq!(api.holders[0].owner, "a");
    assert_eq!(api.holders[0].agent_id.as_deref(), Some("agent-a"));
    assert_eq!(api.waiters[0].owner, "b");
    // Keys are never deleted: released locks stay as (empty) keys.
    let kv = provision::open_bucket(&env.js, &env.names, BUCKET_LOCKS)
        .await
        .unwrap();
    let mut keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    keys.sort();
    let mut expected: Vec<String> = odd_names
        .iter()
        .chain(&["repo:api"])
        .map(|n| lock_key(n))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
    assert!(keys.contains(&"repo=3Aapi".to_string()));

    assert!(locks.force_release("repo:api").await.unwrap());
    assert!(!locks.force_release("repo:api").await.unwrap());
    assert!(!locks.force_release("never-used").await.unwrap());
    let listed = locks.list().await.unwrap();
    let (_, api) = listed.iter().find(|(n, _)| n == "repo:api").unwrap();
    assert!(api.holders.is_empty() && api.mode.is_none());
    assert_eq!(api.waiters.len(), 1, "the queue survives");
    let err = locks
        .renew(&[held("repo:api", LockMode::Exclusive, revision(&a))], "a")
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Kv { .. }));
    let b = locks
        .try_acquire("repo:api", LockMode::Exclusive, "b", None)
        .await
        .unwrap();
    assert!(revision(&b) > revision(&a));
}

#[tokio::test]
async fn invalid_resource_names_are_refused_before_touching_the_bucket() {
    let env = TestEnv::new().await;
    let locks = manager(&env, Duration::from_secs(10)).await;
    for name in ["", "has space", &"x".repeat(201)] {
        assert!(
            locks
                .try_acquire(name, LockMode::Exclusive, "a", None)
                .await
                .is_err(),
            "{name:?}"
        );
    }
    assert!(
        locks
            .acquire_all(
                &[
                    ResourceRequest::exclusive("ok"),
                    ResourceRequest::exclusive("bad\n")
                ],
                "a",
                None,
                Duration::from_secs(1),
            )
            .await
            .is_err()
    );
    assert!(locks.list().await.unwrap().is_empty());
}
