//! Registration and heartbeats over the NATS registry service, and the liveness sweep.

use std::time::Duration;

use omoi::bus::events::Subscription;
use omoi::client::{AgentRegistryClient, ClientError, request_raw};
use omoi::db::agents;
use omoi::domain::{AgentId, AgentStatus, HealthStatus};
use omoi::protocol::registry::{Heartbeat, HeartbeatAck, RegisterRequest};
use omoi::protocol::{ErrorCode, Event};
use omoi::runtime::Shutdown;

use crate::env::{TestEnv, eventually};

fn register_req(name: &str) -> RegisterRequest {
    RegisterRequest {
        v: None,
        executors: vec![],
        name: name.into(),
        agent_type: "worker".into(),
        phase_id: None,
        capabilities: vec!["Python".into(), "analysis ".into()],
        capacity: 3,
        tags: vec![],
        metadata: None,
        instance: None,
    }
}

fn beat(agent_id: AgentId) -> Heartbeat {
    Heartbeat {
        v: 1,
        agent_id,
        load: 0,
        leaving: false,
    }
}

#[tokio::test]
async fn a_silent_agent_goes_stale_then_offline_and_a_heartbeat_brings_it_back() {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    let running = omoi::coordinator::start(&env.settings(), &shutdown)
        .await
        .unwrap();
    let client = AgentRegistryClient::new(env.nats.clone(), env.names.clone());
    let agent = client.register(&register_req("a1")).await.unwrap();
    assert_eq!(agent.capabilities, vec!["analysis", "python"]);
    assert_eq!(
        (agent.status, agent.health_status),
        (AgentStatus::Idle, HealthStatus::Healthy)
    );
    eventually(Duration::from_secs(5), "leadership", || {
        let l = *running.leader.borrow();
        async move { l.then_some(()) }
    })
    .await;

    // Silence: stale after 400 ms, offline after 1 s (TestEnv settings).
    let started = std::time::Instant::now();
    let stale_at = eventually(Duration::from_secs(5), "stale", || async {
        let a = agents::get(&env.pool, agent.id).await.unwrap();
        (a.status == AgentStatus::Stale).then(|| started.elapsed())
    })
    .await;
    let offline_at = eventually(Duration::from_secs(5), "offline", || async {
        let a = agents::get(&env.pool, agent.id).await.unwrap();
        (a.status == AgentStatus::Offline).then(|| (started.elapsed(), a.health_status))
    })
    .await;
    assert!(stale_at >= Duration::from_millis(300), "{stale_at:?}");
    assert_eq!(offline_at.1, HealthStatus::Unresponsive);

    let ack: HeartbeatAck = client.heartbeat(&beat(agent.id)).await.unwrap();
    assert_eq!(ack.status, AgentStatus::Idle);
    let back = agents::get(&env.pool, agent.id).await.unwrap();
    assert_eq!(
        (back.status, back.health_status),
        (AgentStatus::Idle, HealthStatus::Healthy)
    );

    // The KV mirror shows the same record as the database.
    let mirror = omoi::bus::provision::open_bucket(&env.js, &env.names, "agents")
        .await
        .unwrap();
    let mirrored: omoi::protocol::registry::AgentRecord =
        serde_json::from_slice(&mirror.get(agent.id.to_string()).await.unwrap().unwrap()).unwrap();
    assert_eq!(mirrored, back);

    // Every change was announced: idle → stale → offline → idle.
    let mut sub = env
        .bus
        .subscribe(Subscription {
            filter: Some("agent.status.changed".into()),
            ..Subscription::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Event::AgentStatusChanged(c) = &d.value.event {
            seen.push((c.from, c.to));
        }
        d.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        vec![
            (AgentStatus::Idle, AgentStatus::Stale),
            (AgentStatus::Stale, AgentStatus::Offline),
            (AgentStatus::Offline, AgentStatus::Idle),
        ]
    );
    shutdown.drain(Duration::from_secs(5)).await;
}

/// A heartbeat and the `leaving` one sent right after it, without waiting for the first reply,
/// usually reach the control plane in one batch: the leave must still be the last word.
#[tokio::test]
async fn a_leaving_heartbeat_right_after_an_ordinary_one_leaves_the_agent_offline() {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    omoi::coordinator::start(&env.settings(), &shutdown)
        .await
        .unwrap();
    let client = AgentRegistryClient::new(env.nats.clone(), env.names.clone());
    for round in 0..5 {
        let agent = client
            .register(&register_req(&format!("leaver-{round}")))
            .await
            .unwrap();
        let subject = env.names.act(agent.id, omoi::bus::names::ACT_HEARTBEAT);
        let ordinary = serde_json::to_vec(&beat(agent.id)).unwrap();
        let leaving = serde_json::to_vec(&Heartbeat {
            leaving: true,
            ..beat(agent.id)
        })
        .unwrap();
        let (a, b) = tokio::join!(
            env.nats.request(subject.clone(), ordinary.into()),
            env.nats.request(subject.clone(), leaving.into()),
        );
        a.unwrap();
        b.unwrap();
        let status = agents::get(&env.pool, agent.id).await.unwrap().status;
        assert_eq!(status, AgentStatus::Offline, "round {round}");
    }
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_heartbeats_get_error_replies_and_store_nothing() {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    omoi::coordinator::start(&env.settings(), &shutdown)
        .await
        .unwrap();
    let client = AgentRegistryClient::new(env.nats.clone(), env.names.clone());

    let stranger = AgentId::new();
    let err = client.heartbeat(&beat(stranger)).await.unwrap_err();
    assert!(err.code() == Some(ErrorCode::UnknownAgent), "{err}");

    let malformed = request_raw::<HeartbeatAck>(
        &env.nats,
        env.names.act(stranger, omoi::bus::names::ACT_HEARTBEAT),
        "{\"agent_id\": 12".into(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        malformed.code() == Some(ErrorCode::Malformed),
        "{malformed}"
    );

    let agent = client.register(&register_req("a1")).await.unwrap();
    let mismatched = request_raw::<HeartbeatAck>(
        &env.nats,
        env.names.act(stranger, omoi::bus::names::ACT_HEARTBEAT),
        serde_json::to_vec(&beat(agent.id)).unwrap().into(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&mismatched, ClientError::Remote(e) if e.code == ErrorCode::Validation && e.field.as_deref() == Some("agent_id")),
        "{mismatched}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "only the registered agent exists");

    // The service keeps answering after all that.
    client.heartbeat(&beat(agent.id)).await.unwrap();
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_live_name_cannot_be_registered_twice_but_a_silent_one_is_taken_over() {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    omoi::coordinator::start(&env.settings(), &shutdown)
        .await
        .unwrap();
    let client = AgentRegistryClient::new(env.nats.clone(), env.names.clone());
    let first = client.register(&register_req("a1")).await.unwrap();
    let dup = client.register(&register_req("a1")).await.unwrap_err();
    assert!(dup.code() == Some(ErrorCode::Conflict), "{dup}");

    eventually(Duration::from_secs(5), "stale", || async {
        let a = agents::get(&env.pool, first.id).await.unwrap();
        (a.status == AgentStatus::Stale).then_some(())
    })
    .await;
    let mut again = register_req("a1");
    again.capabilities = vec!["rust".into()];
    let second = client.register(&again).await.unwrap();
    assert_eq!(second.id, first.id, "the same agent comes back");
    assert_eq!(second.capabilities, vec!["rust"]);
    assert_eq!(second.status, AgentStatus::Idle);
    shutdown.drain(Duration::from_secs(5)).await;
}
