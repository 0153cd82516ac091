//! Collaboration end to end: threads, messages, inboxes, handoffs that move work, WebSockets.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use omoi::domain::TaskStatus;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::cluster::{Cluster, patient, task};
use crate::env::eventually;
use crate::http::Http;

async fn register(http: &Http, name: &str, caps: &[&str]) -> String {
    let (status, v) = http
        .post(
            "/api/v1/agents/register",
            &json!({"name": name, "capabilities": caps, "capacity": 2}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Task `key` of the workflow once it runs.
async fn running(
    c: &Cluster,
    workflow: omoi::domain::WorkflowId,
    key: &str,
) -> omoi::protocol::workflows::TaskRecord {
    eventually(Duration::from_secs(10), "running", || async {
        let v = c.client.get(workflow).await.unwrap();
        let t = task(&v, key).clone();
        (t.status == TaskStatus::Running).then_some(t)
    })
    .await
}

async fn agent_id(c: &Cluster, name: &str) -> String {
    omoi::db::agents::get_live_by_name(&c.env.pool, name)
        .await
        .unwrap()
        .unwrap()
        .id
        .to_string()
}

#[tokio::test]
async fn threads_messages_cursors_and_read_receipts() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let a = register(&http, "a", &["x"]).await;
    let b = register(&http, "b", &["x"]).await;
    let outsider = register(&http, "outsider", &["x"]).await;
    // A task for context (it waits: nobody has capability `nobody`).
    let wf = c
        .submit(json!({"name": "ctx", "tasks": [{"key": "t", "capabilities": ["nobody"]}]}))
        .await;
    let task_id = wf.tasks["t"].to_string();

    let (status, with_task) = http
        .post("/api/v1/collaboration/threads", &json!({"thread_type": "review", "participants": [a, b], "task_id": task_id, "title": "review t"}))
        .await;
    assert_eq!(status, 201, "{with_task}");
    assert_eq!(with_task["status"], "active");
    let (status, plain) = http
        .post(
            "/api/v1/collaboration/threads",
            &json!({"thread_type": "discussion", "participants": [a, outsider]}),
        )
        .await;
    assert_eq!(status, 201);
    let thread = with_task["id"].as_str().unwrap().to_string();

    let (_, by_task) = http
        .get(&format!(
            "/api/v1/collaboration/threads?ticket_id={task_id}"
        ))
        .await;
    assert_eq!(by_task.as_array().unwrap().len(), 1);
    let (_, by_agent) = http
        .get(&format!("/api/v1/collaboration/threads?agent_id={a}"))
        .await;
    assert_eq!(by_agent.as_array().unwrap().len(), 2);
    let (_, by_b) = http
        .get(&format!(
            "/api/v1/collaboration/threads?agent_id={b}&status=active"
        ))
        .await;
    assert_eq!(by_b.as_array().unwrap().len(), 1);

    let mut sent = Vec::new();
    for i in 0..5 {
        let (status, m) = http
            .post(
                "/api/v1/collaboration/messages",
                &json!({"thread_id": thread, "sender_id": a, "content": format!("m{i}")}),
            )
            .await;
        assert_eq!(status, 201, "{m}");
        sent.push(m["id"].as_str().unwrap().to_string());
    }
    // Newest first, two per page, following the cursor.
    let (_, page1) = http
        .get(&format!(
            "/api/v1/collaboration/threads/{thread}/messages?limit=2"
        ))
        .await;
    let contents = |p: &Value| -> Vec<String> {
        p["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(contents(&page1), vec!["m4", "m3"]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = http
        .get(&format!(
            "/api/v1/collaboration/threads/{thread}/messages?limit=2&before={cursor}"
        ))
        .await;
    assert_eq!(contents(&page2), vec!["m2", "m1"]);

    // Read receipts and the unread filter (upstream took agent_id as a query parameter).
    let (status, read) = http
        .post(
            &format!(
                "/api/v1/collaboration/messages/{}/read?agent_id={b}",
                sent[4]
            ),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["read_by"], json!([b]));
    http.post(
        &format!("/api/v1/collaboration/messages/{}/read", sent[3]),
        &json!({"agent_id": b}),
    )
    .await;
    let (_, unread) = http
        .get(&format!(
            "/api/v1/collaboration/threads/{thread}/messages?unread_for={b}"
        ))
        .await;
    assert_eq!(contents(&unread), vec!["m2", "m1", "m0"]);

    // Bad input.
    let (status, v) = http
        .post(
            "/api/v1/collaboration/messages",
            &json!({"thread_id": thread, "sender_id": outsider, "content": "hi"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = http
        .post("/api/v1/collaboration/threads", &json!({"thread_type": "review", "participants": [a, "00000000-0000-0000-0000-000000000000"]}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = http
        .get("/api/v1/collaboration/threads/00000000-0000-0000-0000-000000000000/messages")
        .await;
    assert_eq!(status, 404);
    let (status, v) = http
        .post(
            "/api/v1/collaboration/messages",
            &json!({"thread_id": thread, "sender_id": a, "content": "x".repeat(70_000)}),
        )
        .await;
    assert_eq!(status, 413);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("65536"),
        "{v}"
    );
    let (status, _) = http
        .post(
            "/api/v1/collaboration/threads",
            &json!({"thread_type": "gossip", "participants": [a]}),
        )
        .await;
    assert_eq!(status, 400);

    // Closing: no more messages.
    let (status, closed) = http
        .post(
            &format!(
                "/api/v1/collaboration/threads/{}/close",
                plain["id"].as_str().unwrap()
            ),
            &json!({}),
        )
        .await;
    assert_eq!((status, closed["status"].as_str()), (200, Some("resolved")));
    let (status, _) = http
        .post(
            "/api/v1/collaboration/messages",
            &json!({"thread_id": plain["id"], "sender_id": a, "content": "late"}),
        )
        .await;
    assert_eq!(status, 409);
    c.stop().await;
}

#[tokio::test]
async fn handoffs_keep_their_state_reason_and_refuse_a_second_decision() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let a = register(&http, "a", &["x"]).await;
    let b = register(&http, "b", &["x", "y"]).await;
    let z = register(&http, "z", &["z"]).await;
    let wf = c
        .submit(json!({"name": "h", "tasks": [{"key": "t", "capabilities": ["nobody"]}]}))
        .await;
    let task_id = wf.tasks["t"].to_string();

    let (status, h) = http
        .post("/api/v1/collaboration/handoff/request", &json!({"task_id": task_id, "from_agent_id": a, "to_agent_id": b, "reason": "needs y", "on_decline": "requester"}))
        .await;
    assert_eq!(status, 201, "{h}");
    let id = h["id"].as_str().unwrap().to_string();
    let (status, _) = http
        .post(
            &format!("/api/v1/collaboration/handoff/{id}/accept?agent_id={z}"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 403, "an ineligible agent cannot accept");
    let (status, d) = http
        .post(
            &format!("/api/v1/collaboration/handoff/{id}/decline?agent_id={b}&reason=too%20busy"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(
        (d["status"].as_str(), d["decision_reason"].as_str()),
        (Some("declined"), Some("too busy"))
    );
    let (status, v) = http
        .post(
            &format!("/api/v1/collaboration/handoff/{id}/accept"),
            &json!({"agent_id": b}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let (_, got) = http
        .get(&format!("/api/v1/collaboration/handoffs/{id}"))
        .await;
    assert_eq!(got["status"], "declined");

    // Accept with a JSON body; the task is pinned to the acceptor with the context in its input.
    let (_, h2) = http
        .post("/api/v1/collaboration/handoff/request", &json!({"task_id": task_id, "from_agent_id": a, "to_agent_id": b, "context": {"notes": "see log"}}))
        .await;
    let id2 = h2["id"].as_str().unwrap();
    let (status, acc) = http
        .post(
            &format!("/api/v1/collaboration/handoff/{id2}/accept"),
            &json!({"agent_id": b}),
        )
        .await;
    assert_eq!(
        (status, acc["status"].as_str()),
        (200, Some("accepted")),
        "{acc}"
    );
    let t = omoi::db::tasks::get(&c.env.pool, wf.tasks["t"])
        .await
        .unwrap();
    assert_eq!(t.pinned_agent_id.map(|p| p.to_string()), Some(b.clone()));
    assert_eq!(t.input["handoff"]["context"]["notes"], "see log");
    let (status, _) = http
        .post(
            "/api/v1/collaboration/handoff/request",
            &json!({"task_id": task_id, "from_agent_id": a}),
        )
        .await;
    assert_eq!(status, 400, "neither a target nor capabilities");
    c.stop().await;
}

#[tokio::test]
async fn an_accepted_handoff_moves_a_running_task_from_one_worker_to_another() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("alice", "x", 1).await;
    let wf = c
        .submit(json!({"name": "move", "tasks": [{"key": "job", "executor": "shell", "capabilities": ["x"],
            "input": {"command": "sleep 2; echo \"{\\\"by\\\": \\\"$OMOI_AGENT\\\", \\\"attempt\\\": $OMOI_ATTEMPT}\""}}]}))
        .await;
    let running = running(&c, wf.workflow_id, "job").await;
    c.spawn_shell_worker("bob", "x", 1).await;
    let http = c.http();
    let (alice, bob) = (agent_id(&c, "alice").await, agent_id(&c, "bob").await);
    assert_eq!(running.agent_id.unwrap().to_string(), alice);
    let (_, h) = http
        .post("/api/v1/collaboration/handoff/request", &json!({"task_id": running.id, "from_agent_id": alice, "to_agent_id": bob, "reason": "shift change", "context": {"progress": "half"}}))
        .await;
    let (status, _) = http
        .post(
            &format!(
                "/api/v1/collaboration/handoff/{}/accept",
                h["id"].as_str().unwrap()
            ),
            &json!({"agent_id": bob}),
        )
        .await;
    assert_eq!(status, 200);
    // Alice's attempt is fenced: a report from it now changes nothing.
    let late = omoi::protocol::TaskReport {
        v: 1,
        task_id: running.id,
        attempt: running.attempt,
        agent_id: running.agent_id.unwrap(),
        outcome: omoi::protocol::Outcome::Completed {
            output: json!({"by": "alice-late"}),
            lock_wait_ms: None,
            running_ms: None,
        },
    };
    c.env
        .js
        .publish(
            c.env.names.result(running.agent_id.unwrap(), running.id),
            serde_json::to_vec(&late).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    let job = task(&view, "job");
    assert_eq!(job.status, TaskStatus::Completed);
    assert_eq!(
        job.output.as_ref().unwrap()["by"],
        "bob",
        "{:?}",
        job.output
    );
    assert_eq!(job.attempt, running.attempt + 1);
    assert_eq!(job.input["handoff"]["context"]["progress"], "half");
    c.stop().await;
}

#[tokio::test]
async fn two_agents_racing_to_accept_an_open_handoff_get_exactly_one_winner() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let a = register(&http, "a", &["x"]).await;
    let b = register(&http, "b", &["review"]).await;
    let d = register(&http, "d", &["review"]).await;
    for round in 0..5 {
        let wf = c.submit(json!({"name": format!("race{round}"), "tasks": [{"key": "t", "capabilities": ["nobody"]}]})).await;
        let (_, h) = http
            .post(
                "/api/v1/collaboration/handoff/request",
                &json!({"task_id": wf.tasks["t"], "from_agent_id": a, "capabilities": ["review"]}),
            )
            .await;
        let id = h["id"].as_str().unwrap();
        let path = format!("/api/v1/collaboration/handoff/{id}/accept");
        let (by_b, by_d) = (json!({"agent_id": b}), json!({"agent_id": d}));
        let ((s1, _), (s2, _)) = tokio::join!(http.post(&path, &by_b), http.post(&path, &by_d));
        let mut statuses = [s1, s2];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "round {round}");
        let (_, got) = http
            .get(&format!("/api/v1/collaboration/handoffs/{id}"))
            .await;
        let winner = got["decided_by"].as_str().unwrap().to_string();
        let t = omoi::db::tasks::get(&c.env.pool, wf.tasks["t"])
            .await
            .unwrap();
        // Pinned to the winner — or, if the scheduler was quick, already dispatched to it.
        let holder = t.pinned_agent_id.or(t.agent_id).map(|p| p.to_string());
        assert_eq!(holder, Some(winner));
    }
    c.stop().await;
}

#[tokio::test]
async fn an_expired_handoff_returns_the_task_to_scheduling() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("w1", "x", 1).await;
    let wf = c
        .submit(json!({"name": "exp", "tasks": [{"key": "job", "executor": "sleep", "capabilities": ["x"], "input": {"ms": 1500}}]}))
        .await;
    let running = running(&c, wf.workflow_id, "job").await;
    let http = c.http();
    let (_, h) = http
        .post("/api/v1/collaboration/handoff/request", &json!({"task_id": running.id, "from_agent_id": running.agent_id, "capabilities": ["nobody-has-this"], "ttl_seconds": 1, "on_decline": "reschedule"}))
        .await;
    let id = h["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "expired", || async {
        let (_, got) = http
            .get(&format!("/api/v1/collaboration/handoffs/{id}"))
            .await;
        (got["status"] == "expired").then_some(())
    })
    .await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    let job = task(&view, "job");
    assert_eq!(job.status, TaskStatus::Completed);
    assert_eq!(
        job.attempt,
        running.attempt + 1,
        "rescheduled as a new attempt"
    );
    c.stop().await;
}

/// A task its holder released to wait for a handoff is parked at its attempt; the decline puts
/// it back to ready and it runs again, at the next attempt (the parked attempt, not the text
/// of its error, says it waits for this decision).
#[tokio::test]
async fn a_released_task_whose_handoff_is_declined_is_scheduled_again() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("w1", "x", 1).await;
    let http = c.http();
    let b = register(&http, "b", &["y"]).await;
    let wf = c
        .submit(json!({"name": "rel", "tasks": [{"key": "job", "executor": "sleep", "capabilities": ["x"], "input": {"ms": 1500}}]}))
        .await;
    let running = running(&c, wf.workflow_id, "job").await;
    let (status, h) = http
        .post("/api/v1/collaboration/handoff/request", &json!({"task_id": running.id, "from_agent_id": running.agent_id, "to_agent_id": b, "release": true, "attempt": running.attempt, "on_decline": "reschedule"}))
        .await;
    assert_eq!(status, 201, "{h}");
    let parked = c.client.get(wf.workflow_id).await.unwrap();
    assert_eq!(task(&parked, "job").status, TaskStatus::RetryWait);
    let id = h["id"].as_str().unwrap().to_string();
    let (status, d) = http
        .post(
            &format!("/api/v1/collaboration/handoff/{id}/decline?agent_id={b}"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    let job = task(&view, "job");
    assert_eq!(job.status, TaskStatus::Completed);
    assert_eq!(
        job.attempt,
        running.attempt + 1,
        "run again at the next attempt"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_message_to_a_stopped_workers_agent_is_delivered_in_order_when_it_restarts() {
    let mut c = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox_dir = dir.path().to_str().unwrap().to_string();
    let env = [("OMOI_WORKER_INBOX_DIR", inbox_dir.as_str())];
    c.spawn_worker_with("sleeper", "x", 1, &env).await;
    c.spawn_worker_with("talker", "x", 1, &env).await;
    let (sleeper, talker) = (agent_id(&c, "sleeper").await, agent_id(&c, "talker").await);
    c.stop_worker("sleeper").await;
    let http = c.http();
    let (_, thread) = http
        .post(
            "/api/v1/collaboration/threads",
            &json!({"thread_type": "consultation", "participants": [sleeper, talker]}),
        )
        .await;
    for i in 0..3 {
        let (status, v) = http
            .post("/api/v1/collaboration/messages", &json!({"thread_id": thread["id"], "sender_id": talker, "content": format!("while you were out {i}")}))
            .await;
        assert_eq!(status, 201, "{v}");
    }
    c.spawn_worker_with("sleeper", "x", 1, &env).await;
    let file = dir.path().join("sleeper.jsonl");
    let lines = eventually(Duration::from_secs(15), "inbox delivered", || async {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    let contents: Vec<&str> = lines
        .iter()
        .map(|l| l["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        vec![
            "while you were out 0",
            "while you were out 1",
            "while you were out 2"
        ]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["kind"] == "message" && l["sender_id"] == json!(talker))
    );
    c.stop().await;
}

#[tokio::test]
async fn a_websocket_client_sees_messages_sent_over_http_and_nats_in_order() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let a = register(&http, "a", &["x"]).await;
    let b = register(&http, "b", &["x"]).await;
    let (_, thread) = http
        .post(
            "/api/v1/collaboration/threads",
            &json!({"thread_type": "discussion", "participants": [a, b]}),
        )
        .await;
    let mut ws = c
        .ws(&format!("/api/v1/collaboration/ws?agent_id={b}"))
        .await;
    ready(&mut ws).await;

    http.post(
        "/api/v1/collaboration/messages",
        &json!({"thread_id": thread["id"], "sender_id": a, "content": "over http"}),
    )
    .await;
    let over_nats = json!({"thread_id": thread["id"], "sender_id": a, "content": "over nats"});
    let _: omoi::protocol::collaboration::Message = omoi::client::request(
        &c.env.nats,
        c.env
            .names
            .act(a.parse().unwrap(), omoi::bus::names::ACT_SEND),
        &over_nats,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let first = next_event(&mut ws).await;
    let second = next_event(&mut ws).await;
    assert_eq!(
        (first["type"].as_str(), first["data"]["content"].as_str()),
        (Some("agent.message.sent"), Some("over http"))
    );
    assert_eq!(second["data"]["content"], "over nats");

    // A malformed frame gets an error frame; the connection stays and takes new filters.
    ws.send(Ws::Text("{nope".into())).await.unwrap();
    let err = next_event(&mut ws).await;
    assert_eq!(err["type"], "error");
    ws.send(Ws::Text(
        json!({"filters": {"types": ["agent.collab.*"], "agent_id": b}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut ws).await["type"], "filters");
    http.post(
        &format!(
            "/api/v1/collaboration/threads/{}/close",
            thread["id"].as_str().unwrap()
        ),
        &json!({}),
    )
    .await;
    let ended = next_event(&mut ws).await;
    assert_eq!(ended["type"], "agent.collab.ended");
    c.stop().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame as JSON (pings and pongs skipped).
/// Waits for the stream's `{"type": "ready"}`: from then on every event committed reaches it.
async fn ready(ws: &mut Socket) {
    let frame = next_event(ws).await;
    assert_eq!(frame["type"], "ready", "{frame}");
}

async fn next_event(ws: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ws::Text(t) = frame {
            return serde_json::from_str::<Value>(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn an_executor_asks_for_a_handoff_and_the_worker_releases_the_task_to_the_acceptor() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("generalist", "x", 1).await;
    let script = format!(
        "if [ \"$OMOI_AGENT\" = generalist ]; then echo '{{\"handoff\": {{\"capabilities\": [\"y\"], \"reason\": \"needs y\", \"context\": {{\"tried\": 1}}}}}}'; exit {}; fi; echo \"{{\\\"by\\\": \\\"$OMOI_AGENT\\\"}}\"",
        omoi::worker::executor::SHELL_HANDOFF_EXIT
    );
    let wf = c
        .submit(json!({"name": "ask", "tasks": [{"key": "job", "executor": "shell", "capabilities": ["x"], "input": {"command": script}}]}))
        .await;
    let http = c.http();
    // The worker asked: the task waits for the decision instead of running anywhere.
    let handoff = eventually(Duration::from_secs(15), "handoff requested", || async {
        let rows: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM handoffs")
            .fetch_all(&c.env.pool)
            .await
            .unwrap();
        rows.first().map(|r| r.0)
    })
    .await;
    let parked = omoi::db::tasks::get(&c.env.pool, wf.tasks["job"])
        .await
        .unwrap();
    assert_eq!(parked.status, TaskStatus::RetryWait);
    let (_, h) = http
        .get(&format!("/api/v1/collaboration/handoffs/{handoff}"))
        .await;
    assert_eq!(
        (h["reason"].as_str(), h["capabilities"].clone()),
        (Some("needs y"), json!(["y"]))
    );
    c.spawn_shell_worker("specialist", "x,y", 1).await;
    let specialist = agent_id(&c, "specialist").await;
    let (status, v) = http
        .post(
            &format!("/api/v1/collaboration/handoff/{handoff}/accept"),
            &json!({"agent_id": specialist}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let view = c.wait(wf.workflow_id, Duration::from_secs(20)).await;
    let job = task(&view, "job");
    assert_eq!(job.status, TaskStatus::Completed);
    assert_eq!(job.output.as_ref().unwrap()["by"], "specialist");
    assert_eq!(job.input["handoff"]["context"]["tried"], 1);
    c.stop().await;
}

#[tokio::test]
async fn a_websocket_client_that_does_not_read_is_closed_with_1013_and_a_filtered_stream_works() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let b = register(&http, "b", &["x"]).await;

    // A general event stream filtered to one workflow's events.
    let wf = c
        .submit(json!({"name": "watched", "tasks": [{"key": "t", "capabilities": ["nobody"]}]}))
        .await;
    let mut events = c
        .ws(&format!(
            "/api/v1/ws/events?types=workflow.*&workflow_id={}",
            wf.workflow_id
        ))
        .await;
    ready(&mut events).await;
    c.submit(json!({"name": "other", "tasks": [{"key": "t"}]}))
        .await;
    c.client.cancel(wf.workflow_id).await.unwrap();
    let got = next_event(&mut events).await;
    assert_eq!(
        (got["type"].as_str(), got["data"]["workflow_id"].clone()),
        (Some("workflow.cancelled"), json!(wf.workflow_id))
    );

    // A client that never reads while a flood of 10 KiB messages arrives.
    let mut slow = c
        .ws(&format!("/api/v1/collaboration/ws?agent_id={b}"))
        .await;
    ready(&mut slow).await;
    let agent: omoi::domain::AgentId = b.parse().unwrap();
    let flood: Vec<omoi::protocol::Event> = (0..4_000)
        .map(|i| {
            omoi::protocol::Event::MessageSent(omoi::protocol::events::MessageSent {
                message_id: uuid::Uuid::now_v7(),
                thread_id: uuid::Uuid::now_v7(),
                sender_id: omoi::domain::AgentId::new(),
                recipient_id: Some(agent),
                recipients: vec![agent],
                message_type: "text".into(),
                content: format!("{i}:{}", "x".repeat(10_000)),
                metadata: json!({}),
                created_at: chrono::Utc::now(),
            })
        })
        .collect();
    c.env.bus.publish_all(flood).await.unwrap();
    // Reading now drains what the network buffered, then the close frame.
    let mut frames = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
            Ok(Some(Ok(Ws::Close(Some(frame))))) => break Some(u16::from(frame.code)),
            Ok(Some(Ok(_))) => frames += 1,
            Ok(Some(Err(_))) | Ok(None) => break None,
            Err(_) => panic!("no close after {frames} frames"),
        }
    };
    assert_eq!(
        code,
        Some(omoi::api::ws::CLOSE_TOO_SLOW),
        "after {frames} frames"
    );
    assert!(frames < 4_000, "the client was not sent everything");
    c.stop().await;
}

#[tokio::test]
async fn the_event_stream_carries_coordination_events_and_a_workflows_events_in_commit_order() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w1", "x", 4).await;
    // The documented form: `>` encoded, as a URL must have it.
    let mut events = c
        .ws("/api/v1/ws/events?types=task.%3E,workflow.*,coordination.%3E")
        .await;
    ready(&mut events).await;
    for round in 0..3 {
        let wf = c
            .submit(json!({"name": format!("ordered{round}"), "tasks": [
                {"key": "plan", "input": {"items": [1, 2, 3, 4, 5, 6]}},
                {"key": "fan", "depends_on": ["plan"],
                 "split": {"items": "${deps.plan.output.input.items}", "task": {}}},
                {"key": "after", "depends_on": ["fan"]}]}))
            .await;
        let id = json!(wf.workflow_id);
        let mut seen: Vec<String> = Vec::new();
        loop {
            let e = next_event(&mut events).await;
            let mine = e["data"]["workflow_id"] == id;
            if !mine {
                continue;
            }
            let kind = e["type"].as_str().unwrap().to_string();
            let end = kind == "workflow.completed";
            seen.push(kind);
            if end {
                break;
            }
        }
        assert!(
            seen.iter().any(|k| k.starts_with("coordination.")),
            "round {round}: {seen:?}"
        );
        // plan, fan (the node completes when its children have), 6 children, after.
        let completed = seen.iter().filter(|k| *k == "task.completed").count();
        assert_eq!(completed, 9, "round {round}: {seen:?}");
    }
    c.stop().await;
}

/// What a NATS-only agent does with a thread besides writing to it: read its history page by
/// page (only its unread messages, if it likes) and close it — as a participant only.
#[tokio::test]
async fn a_nats_only_agent_lists_a_threads_messages_by_page_and_closes_it() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let a: omoi::domain::AgentId = register(&http, "a", &["x"]).await.parse().unwrap();
    let b: omoi::domain::AgentId = register(&http, "b", &["x"]).await.parse().unwrap();
    let outsider: omoi::domain::AgentId =
        register(&http, "outsider", &["x"]).await.parse().unwrap();
    let act = |agent, verb: &str| c.env.names.act(agent, verb);
    let ask = |agent, verb: &'static str, body: Value| {
        let subject = act(agent, verb);
        let nats = c.env.nats.clone();
        async move {
            omoi::client::request::<_, Value>(&nats, subject, &body, Duration::from_secs(5)).await
        }
    };
    use omoi::bus::names::{ACT_CLOSE, ACT_MESSAGES, ACT_READ, ACT_SEND, ACT_THREAD};
    let thread = ask(
        a,
        ACT_THREAD,
        json!({"v": 1, "thread_type": "discussion", "participants": [a, b]}),
    )
    .await
    .unwrap();
    let thread_id = thread["id"].clone();
    let mut sent = Vec::new();
    for n in 0..5 {
        let m = ask(
            a,
            ACT_SEND,
            json!({"v": 1, "thread_id": thread_id, "sender_id": a, "content": format!("m{n}")}),
        )
        .await
        .unwrap();
        sent.push(m["id"].clone());
    }
    // b reads one, then pages through the history, newest first.
    ask(b, ACT_READ, json!({"message_id": sent[4]}))
        .await
        .unwrap();
    let first = ask(b, ACT_MESSAGES, json!({"thread_id": thread_id, "limit": 3}))
        .await
        .unwrap();
    let contents = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(contents(&first), ["m4", "m3", "m2"]);
    let rest = ask(
        b,
        ACT_MESSAGES,
        json!({"thread_id": thread_id, "limit": 3, "before": first["next_cursor"]}),
    )
    .await
    .unwrap();
    assert_eq!(contents(&rest), ["m1", "m0"]);
    assert!(rest["next_cursor"].is_null(), "{rest}");
    let unread = ask(
        b,
        ACT_MESSAGES,
        json!({"thread_id": thread_id, "unread": true}),
    )
    .await
    .unwrap();
    assert_eq!(contents(&unread), ["m3", "m2", "m1", "m0"]);
    // Someone outside the thread neither reads nor closes it.
    for (verb, body) in [
        (ACT_MESSAGES, json!({"thread_id": thread_id})),
        (ACT_CLOSE, json!({"thread_id": thread_id})),
    ] {
        let err = ask(outsider, verb, body).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(omoi::protocol::ErrorCode::Forbidden),
            "{verb}: {err}"
        );
    }
    let closed = ask(
        b,
        ACT_CLOSE,
        json!({"thread_id": thread_id, "status": "abandoned"}),
    )
    .await
    .unwrap();
    assert_eq!(closed["status"], "abandoned");
    assert!(closed["closed_at"].is_string(), "{closed}");
    let again = ask(a, ACT_CLOSE, json!({"thread_id": thread_id}))
        .await
        .unwrap_err();
    assert_eq!(
        again.code(),
        Some(omoi::protocol::ErrorCode::Conflict),
        "{again}"
    );
}
