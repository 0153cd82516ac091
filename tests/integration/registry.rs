//! The agent registry over HTTP and over its NATS service: upstream's scenarios and bad input.

use std::time::Duration;

use omoi::bus::events::Subscription;
use omoi::client::{AgentRegistryClient, ClientError};
use omoi::db::agents::{self};
use omoi::domain::{AgentStatus, HealthStatus};
use omoi::protocol::registry::{
    AgentMatch, AgentRecord, AgentUpdate, RegisterRequest, SearchQuery,
};
use omoi::protocol::{ErrorCode, Event};
use omoi::runtime::Shutdown;
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::http::Http;

struct Registry {
    env: TestEnv,
    http: Http,
    client: AgentRegistryClient,
    _shutdown: ShutdownOnDrop,
}

struct ShutdownOnDrop(Shutdown);
impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.token.cancel();
    }
}

async fn start() -> Registry {
    start_with(|_| {}).await
}

async fn start_with(tune: impl FnOnce(&mut omoi::config::Settings)) -> Registry {
    let env = TestEnv::new().await;
    let shutdown = Shutdown::new();
    let mut settings = env.settings();
    tune(&mut settings);
    let running = omoi::coordinator::start(&settings, &shutdown)
        .await
        .unwrap();
    let client = AgentRegistryClient::new(env.nats.clone(), env.names.clone());
    Registry {
        http: Http::with_token(running.http_addr, &env.admin_token),
        env,
        client,
        _shutdown: ShutdownOnDrop(shutdown),
    }
}

impl Registry {
    async fn register(&self, body: Value) -> AgentRecord {
        let (status, v) = self.http.post("/api/v1/agents/register", &body).await;
        assert_eq!(status, 201, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// The `<ns>_agents` mirror entry equals the database row.
    async fn assert_mirrored(&self, agent: &AgentRecord) {
        let db = agents::get(&self.env.pool, agent.id).await.unwrap();
        let kv = omoi::bus::provision::open_bucket(&self.env.js, &self.env.names, "agents")
            .await
            .unwrap();
        let entry = kv.get(agent.id.to_string()).await.unwrap();
        if db.status == AgentStatus::Terminated {
            assert!(entry.is_none(), "deregistered agents leave the mirror");
        } else {
            let mirrored: AgentRecord = serde_json::from_slice(&entry.expect("mirrored")).unwrap();
            assert_eq!(mirrored, db);
        }
    }
}

#[tokio::test]
async fn registration_echoes_every_field_and_is_healthy() {
    let r = start().await;
    let agent = r
        .register(json!({
            "name": "analyst-1", "agent_type": "analyst", "phase_id": "PHASE_IMPLEMENTATION",
            "capabilities": ["Analysis", " python", "python"], "capacity": 3,
            "tags": ["GPU"], "metadata": {"model": "x"}
        }))
        .await;
    assert_eq!(agent.name, "analyst-1");
    assert_eq!(agent.agent_type, "analyst");
    assert_eq!(agent.phase_id.as_deref(), Some("PHASE_IMPLEMENTATION"));
    assert_eq!(agent.capabilities, vec!["analysis", "python"]);
    assert_eq!(agent.capacity, 3);
    assert_eq!(agent.tags, vec!["gpu"]);
    assert_eq!(agent.metadata, json!({"model": "x"}));
    assert_eq!(
        (agent.status, agent.health_status),
        (AgentStatus::Idle, HealthStatus::Healthy)
    );
    assert!(agent.last_heartbeat.is_some());
    r.assert_mirrored(&agent).await;
    let (status, got) = r.http.get(&format!("/api/v1/agents/{}", agent.id)).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_value::<AgentRecord>(got).unwrap(), agent);
}

#[tokio::test]
async fn search_ranks_the_full_match_first_and_partial_only_on_request() {
    let r = start().await;
    let full = r
        .register(json!({"name": "full", "capabilities": ["analysis", "python", "fastapi"], "capacity": 3}))
        .await;
    let partial = r
        .register(json!({"name": "partial", "capabilities": ["analysis"], "capacity": 2}))
        .await;
    // The partial agent is running one task.
    r.client
        .heartbeat(&omoi::protocol::registry::Heartbeat {
            v: 1,
            agent_id: partial.id,
            load: 1,
            leaving: false,
        })
        .await
        .unwrap();
    assert_eq!(
        agents::get(&r.env.pool, partial.id).await.unwrap().status,
        AgentStatus::Running
    );

    let (status, v) = r
        .http
        .get("/api/v1/agents/search?capabilities=analysis&capabilities=python")
        .await;
    assert_eq!(status, 200, "{v}");
    let results: Vec<AgentMatch> = serde_json::from_value(v).unwrap();
    assert_eq!(results.len(), 1, "the partial agent is not a candidate");
    assert_eq!(results[0].agent.id, full.id);
    assert_eq!(results[0].matched_capabilities, vec!["analysis", "python"]);

    let (_, v) = r
        .http
        .get("/api/v1/agents/search?capabilities=analysis,python&partial=true")
        .await;
    let results: Vec<AgentMatch> = serde_json::from_value(v).unwrap();
    let order: Vec<_> = results.iter().map(|m| m.agent.id).collect();
    assert_eq!(order, vec![full.id, partial.id]);
    assert!(results[0].match_score > results[1].match_score);
    assert_eq!(results[1].matched_capabilities, vec!["analysis"]);

    // The same search over the NATS service.
    let over_nats = r
        .client
        .search(&SearchQuery {
            capabilities: vec!["analysis".into(), "python".into()],
            partial: true,
            ..SearchQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        over_nats.iter().map(|m| m.agent.id).collect::<Vec<_>>(),
        order
    );
}

#[tokio::test]
async fn best_fit_skips_an_agent_at_full_capacity() {
    let r = start().await;
    let busy = r
        .register(json!({"name": "busy", "capabilities": ["rust"], "capacity": 1}))
        .await;
    let (status, _) = r
        .http
        .get("/api/v1/agents/best-fit?capabilities=rust")
        .await;
    assert_eq!(status, 200);
    r.http
        .post(
            &format!("/api/v1/agents/{}/heartbeat", busy.id),
            &json!({"load": 1}),
        )
        .await;
    let (status, v) = r
        .http
        .get("/api/v1/agents/best-fit?capabilities=rust")
        .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    let free = r
        .register(json!({"name": "free", "capabilities": ["rust", "go"], "capacity": 1}))
        .await;
    let (status, v) = r
        .http
        .get("/api/v1/agents/best-fit?capabilities=rust")
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["agent"]["id"], json!(free.id));
    let over_nats = r
        .client
        .best_fit(&SearchQuery {
            capabilities: vec!["rust".into()],
            ..SearchQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(over_nats.agent.id, free.id);
}

#[tokio::test]
async fn capability_updates_publish_exactly_when_the_set_changes() {
    let r = start().await;
    let agent = r
        .register(json!({"name": "a", "capabilities": ["analysis"]}))
        .await;
    let path = format!("/api/v1/agents/{}", agent.id);
    let (status, v) = r
        .http
        .patch(&path, &json!({"capabilities": ["analysis", "python"]}))
        .await;
    assert_eq!(status, 200, "{v}");
    r.assert_mirrored(&agent).await;
    let (status, _) = r
        .http
        .patch(&path, &json!({"capabilities": ["Python", "analysis "]}))
        .await;
    assert_eq!(status, 200);
    // Over NATS, also no change.
    r.client
        .update(
            agent.id,
            AgentUpdate {
                capabilities: Some(vec!["python".into(), "analysis".into()]),
                ..AgentUpdate::default()
            },
        )
        .await
        .unwrap();

    let mut sub = r
        .env
        .bus
        .subscribe(Subscription {
            filter: Some("agent.capability.updated".into()),
            ..Subscription::default()
        })
        .await
        .unwrap();
    let mut updates = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        if let Event::AgentCapabilityUpdated(u) = &d.value.event {
            updates.push(u.clone());
        }
        d.ack().await.unwrap();
    }
    assert_eq!(
        updates.len(),
        2,
        "one on register, one on the real change: {updates:?}"
    );
    let change = &updates[1];
    assert_eq!(change.agent_id, agent.id);
    assert_eq!(change.capabilities, vec!["analysis", "python"]);
    assert_eq!(change.added, vec!["python"]);
    assert!(change.removed.is_empty());
}

#[tokio::test]
async fn availability_status_health_statistics_and_deregistration() {
    let r = start().await;
    let a = r
        .register(json!({"name": "a", "capabilities": ["x"], "capacity": 2}))
        .await;
    let b = r
        .register(json!({"name": "b", "capabilities": ["x", "y"], "capacity": 4}))
        .await;
    let (status, v) = r
        .http
        .post(
            &format!("/api/v1/agents/{}/availability", a.id),
            &json!({"available": false}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "maintenance");
    r.assert_mirrored(&a).await;
    let (_, best) = r.http.get("/api/v1/agents/best-fit?capabilities=x").await;
    assert_eq!(
        best["agent"]["id"],
        json!(b.id),
        "maintenance agents are never best fit"
    );
    let (_, v) = r
        .http
        .post(
            &format!("/api/v1/agents/{}/availability", a.id),
            &json!({"available": true}),
        )
        .await;
    assert_eq!(v["status"], "idle");

    let (status, v) = r.http.get(&format!("/api/v1/agents/{}/health", a.id)).await;
    assert_eq!(status, 200);
    assert_eq!(v["health_status"], "healthy");
    let (_, all) = r.http.get("/api/v1/agents/health").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (_, stats) = r.http.get("/api/v1/agents/statistics").await;
    assert_eq!(stats["total_agents"], 2);
    assert_eq!(stats["capabilities"]["x"], 2);
    assert_eq!(stats["total_capacity"], 6);

    let (status, v) = r
        .http
        .patch(
            &format!("/api/v1/agents/{}", a.id),
            &json!({"status": "terminated"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = r.http.delete(&format!("/api/v1/agents/{}", b.id)).await;
    assert_eq!(status, 200, "{v}");
    r.assert_mirrored(&b).await;
    let (status, _) = r.http.delete(&format!("/api/v1/agents/{}", b.id)).await;
    assert_eq!(status, 404);
    // The name is free again.
    r.register(json!({"name": "b", "capabilities": ["x"]}))
        .await;
}

/// A registration whose reply was lost is sent again by the same process: answered with the
/// agent, unchanged and unannounced; another process (or one naming no instance) meets
/// `conflict` while the agent is live. Its consumers are made sure of again.
#[tokio::test]
async fn the_same_instance_registering_again_is_answered_and_another_meets_conflict() {
    // No heartbeats are sent: the agent must stay live (not go stale) however slow the machine.
    let r = start_with(crate::cluster::patient).await;
    let req = |instance: Option<&str>| RegisterRequest {
        v: None,
        name: "retrier".into(),
        agent_type: "worker".into(),
        phase_id: None,
        capabilities: vec!["x".into()],
        capacity: 2,
        tags: vec![],
        metadata: None,
        instance: instance.map(Into::into),
        executors: vec![],
    };
    let first = r.client.register(&req(Some("proc-1"))).await.unwrap();
    // The dispatch consumer the first registration made is gone (as if the control plane died
    // before making it): the repeat makes it again.
    let dispatch = r.env.names.stream(omoi::bus::names::STREAM_DISPATCH);
    let consumer = format!("agent-{}", first.id);
    let stream = r.env.js.get_stream(&dispatch).await.unwrap();
    stream.delete_consumer(&consumer).await.unwrap();

    let again = r.client.register(&req(Some("proc-1"))).await.unwrap();
    assert_eq!(again, first, "answered with the agent as it stands");
    assert!(stream.consumer_info(&consumer).await.is_ok(), "made again");
    for other in [Some("proc-2"), None] {
        let err = r.client.register(&req(other)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Conflict), "{other:?}: {err}");
    }
    let bad = r.client.register(&req(Some("a\u{7}b"))).await.unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::Validation), "{bad}");

    // Only the first registration was announced.
    let mut sub = r
        .env
        .bus
        .subscribe(Subscription {
            filter: Some("agent.registered".into()),
            ..Subscription::default()
        })
        .await
        .unwrap();
    let mut registered = 0;
    // Stored before the first reply: wait for it as long as it takes, then for a second one.
    let quiet = |registered| Duration::from_millis(if registered == 0 { 30_000 } else { 500 });
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet(registered), sub.next()).await {
        if matches!(&d.value.event, Event::AgentRegistered(a) if a.agent_id == first.id) {
            registered += 1;
        }
        d.ack().await.unwrap();
    }
    assert_eq!(registered, 1);
    let gone = r.client.deregister(first.id).await.unwrap();
    assert_eq!(gone.status, AgentStatus::Terminated);
    // Once it is gone, any instance registers the name anew.
    r.client.register(&req(Some("proc-2"))).await.unwrap();
}

#[tokio::test]
async fn an_agent_deregisters_itself_over_nats_and_its_consumers_go() {
    let r = start().await;
    let agent = r
        .client
        .register(&RegisterRequest {
            v: None,
            name: "leaver".into(),
            agent_type: "worker".into(),
            phase_id: None,
            capabilities: vec!["x".into()],
            capacity: 2,
            tags: vec![],
            metadata: None,
            instance: None,
            executors: vec![],
        })
        .await
        .unwrap();
    let dispatch = r.env.names.stream(omoi::bus::names::STREAM_DISPATCH);
    let consumer = format!("agent-{}", agent.id);
    let stream = r.env.js.get_stream(&dispatch).await.unwrap();
    assert!(
        stream.consumer_info(&consumer).await.is_ok(),
        "made at registration"
    );

    let gone = r.client.deregister(agent.id).await.unwrap();
    assert_eq!(gone.id, agent.id);
    assert_eq!(gone.status, AgentStatus::Terminated);
    r.assert_mirrored(&gone).await;
    assert!(
        stream.consumer_info(&consumer).await.is_err(),
        "its dispatch consumer is deleted"
    );
    let again = r.client.deregister(agent.id).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::NotFound), "{again}");
    // Another agent's subject is another agent: a body cannot name someone else.
    let stranger = omoi::domain::AgentId::for_name(r.env.names.namespace(), "nobody");
    let unknown = r.client.deregister(stranger).await.unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::NotFound), "{unknown}");
}

#[tokio::test]
async fn an_agent_over_nats_toggles_its_availability_but_cannot_lift_its_quarantine() {
    let r = start().await;
    let agent = r
        .register(json!({"name": "self-managed", "capabilities": ["x"]}))
        .await;
    let status = |s: AgentStatus| AgentUpdate {
        status: Some(s),
        ..AgentUpdate::default()
    };
    let away = r
        .client
        .update(agent.id, status(AgentStatus::Maintenance))
        .await
        .unwrap();
    assert_eq!(away.status, AgentStatus::Maintenance);
    let back = r
        .client
        .update(agent.id, status(AgentStatus::Idle))
        .await
        .unwrap();
    assert_eq!(back.status, AgentStatus::Idle);
    for other in [
        AgentStatus::Terminated,
        AgentStatus::Quarantined,
        AgentStatus::Running,
    ] {
        let err = r.client.update(agent.id, status(other)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{other}: {err}");
    }
    // An operator quarantines it; the agent cannot undo that, an operator can.
    let (code, v) = r
        .http
        .patch(
            &format!("/api/v1/agents/{}", agent.id),
            &json!({"status": "quarantined"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let err = r
        .client
        .update(agent.id, status(AgentStatus::Idle))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let still = agents::get(&r.env.pool, agent.id).await.unwrap();
    assert_eq!(still.status, AgentStatus::Quarantined);
    let (code, v) = r
        .http
        .post(
            &format!("/api/v1/agents/{}/availability", agent.id),
            &json!({"available": true}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "idle");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_stores_nothing() {
    let r = start().await;
    let cases = [
        (
            json!({"name": "a", "capabilities": [""]}),
            400,
            "capabilities",
        ),
        (
            json!({"name": "a", "capabilities": ["two words"]}),
            400,
            "capabilities",
        ),
        (
            json!({"name": "a", "capabilities": ["x"], "capacity": 0}),
            400,
            "capacity",
        ),
        (
            json!({"name": "a", "capabilities": ["x"], "capacity": 1_000_000}),
            400,
            "capacity",
        ),
        (json!({"name": "", "capabilities": ["x"]}), 400, "name"),
        (json!({"name": "a b", "capabilities": ["x"]}), 400, "name"),
        (json!({"capabilities": ["x"]}), 400, "body"),
    ];
    for (body, code, field) in cases {
        let (status, v) = r.http.post("/api/v1/agents/register", &body).await;
        assert_eq!(status, code, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, v) = r
        .http
        .post_raw("/api/v1/agents/register", "{\"name\": ")
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "malformed");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&r.env.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing stored");

    let (status, v) = r
        .http
        .get("/api/v1/agents/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = r.http.get("/api/v1/agents/not-a-uuid").await;
    assert_eq!(status, 404);
    let (status, v) = r.http.get("/api/v1/agents/search?limit=abc").await;
    assert_eq!((status, v["error"]["field"].as_str()), (400, Some("limit")));

    r.register(json!({"name": "dup", "capabilities": ["x"]}))
        .await;
    let (status, v) = r
        .http
        .post(
            "/api/v1/agents/register",
            &json!({"name": "dup", "capabilities": ["x"]}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("conflict"))
    );

    // Over NATS: malformed JSON gets an error reply and stores nothing; the service survives.
    let err = omoi::client::request_raw::<AgentRecord>(
        &r.env.nats,
        r.env.names.act(
            omoi::domain::AgentId::for_name(r.env.names.namespace(), "x"),
            omoi::bus::names::ACT_REGISTER,
        ),
        "{\"name\": 5".into(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(err.code() == Some(ErrorCode::Malformed), "{err}");
    let bad = r
        .client
        .register(&RegisterRequest {
            v: None,
            executors: vec![],
            name: "n".into(),
            agent_type: "worker".into(),
            phase_id: None,
            capabilities: vec!["ok".into()],
            capacity: -1,
            tags: vec![],
            metadata: None,
            instance: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&bad, ClientError::Remote(e) if e.code == ErrorCode::Validation && e.field.as_deref() == Some("capacity")),
        "{bad}"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&r.env.pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "only `dup`");
    let unknown = r
        .client
        .update(
            omoi::domain::AgentId::new(),
            AgentUpdate {
                capacity: Some(2),
                ..AgentUpdate::default()
            },
        )
        .await
        .unwrap_err();
    assert!(unknown.code() == Some(ErrorCode::NotFound), "{unknown}");
}
