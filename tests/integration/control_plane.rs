//! Control plane plumbing: health endpoints, metrics, and leader election with takeover.

use std::time::Duration;

use omoi::bus::lease::Lease;
use omoi::bus::provision;
use omoi::runtime::Shutdown;

use crate::env::{TestEnv, eventually};
use crate::http::Http;

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    let running = omoi::coordinator::start(&env.settings(), &shutdown)
        .await
        .unwrap();
    let http = Http::with_token(running.http_addr, &env.admin_token);
    let (status, v) = http.get("/healthz").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    let (status, v) = http.get("/readyz").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["nats"].as_str(), v["postgres"].as_str()),
        (Some("ok"), Some("ok"))
    );
    let (status, _) = http.get_text("/metrics").await;
    assert_eq!(status, 200);
    shutdown.drain(Duration::from_secs(5)).await;
    // After shutdown the port is closed.
    assert!(
        tokio::net::TcpStream::connect(running.http_addr)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn one_lease_holder_at_a_time_and_a_standby_takes_over() {
    let env = TestEnv::new().await;
    let kv = provision::open_bucket(&env.js, &env.names, "leases")
        .await
        .unwrap();
    let ttl = Duration::from_millis(600);
    let mut a = Lease::new(kv.clone(), "scheduler", "a", ttl);
    let mut b = Lease::new(kv.clone(), "scheduler", "b", ttl);
    let (ra, rb) = tokio::join!(a.try_acquire(), b.try_acquire());
    assert_ne!(ra.unwrap(), rb.unwrap(), "exactly one wins the race");
    let (mut holder, mut standby) = if a.try_acquire().await.unwrap() {
        (a, b)
    } else {
        (b, a)
    };
    assert!(!standby.try_acquire().await.unwrap());
    // The holder stops renewing (it died): after the TTL the standby takes over.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(standby.try_acquire().await.unwrap());
    assert!(
        !holder.try_acquire().await.unwrap(),
        "the old holder lost it"
    );
    // A clean release hands over at once.
    standby.release().await.unwrap();
    assert!(holder.try_acquire().await.unwrap());
}

#[tokio::test]
async fn a_standby_coordinator_takes_over_when_the_leader_stops() {
    let env = TestEnv::new().await;
    let first = Shutdown::new();
    let second = Shutdown::new();
    let one = omoi::coordinator::start(&env.settings(), &first)
        .await
        .unwrap();
    let two = omoi::coordinator::start(&env.settings(), &second)
        .await
        .unwrap();
    let leaders = || *one.leader.borrow() as u8 + *two.leader.borrow() as u8;
    eventually(Duration::from_secs(5), "a leader", || async {
        (leaders() == 1).then_some(())
    })
    .await;
    let (leader, standby_rx, standby_sd) = if *one.leader.borrow() {
        (first, two.leader.clone(), second)
    } else {
        (second, one.leader.clone(), first)
    };
    leader.drain(Duration::from_secs(5)).await;
    eventually(Duration::from_secs(5), "standby leads", || {
        let l = *standby_rx.borrow();
        async move { l.then_some(()) }
    })
    .await;
    standby_sd.drain(Duration::from_secs(5)).await;
}
