//! Hostile and careless input: whatever arrives over HTTP or NATS gets a clear error or a dead
//! letter with its reason, and never crashes, wedges or starves a process, nor holds back the
//! good items batched with it.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use omoi::bus::names::{HEADER_DEADLETTER_REASON, STREAM_DEADLETTER};
use omoi::domain::{TaskId, TaskStatus};
use omoi::protocol::{Outcome, TaskReport};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{Cluster, patient};
use crate::env::eventually;
use crate::http::Http;

/// Every dead letter of the namespace: (subject, reason, payload).
pub async fn dead_letters(c: &Cluster) -> Vec<(String, String, Vec<u8>)> {
    let stream = c
        .env
        .js
        .get_stream(c.env.names.stream(STREAM_DEADLETTER))
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(1_000)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        let reason = m
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_DEADLETTER_REASON))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        out.push((m.subject.to_string(), reason, m.payload.to_vec()));
    }
    out
}

/// Registers an agent over HTTP and returns its id.
async fn register(http: &Http, name: &str, caps: &[&str]) -> String {
    let (status, agent) = http
        .post(
            "/api/v1/agents/register",
            &json!({"name": name, "capabilities": caps, "capacity": 4}),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    agent["id"].as_str().unwrap().to_string()
}

/// Waits until every task of `ids` is assigned, and returns (id, attempt, agent) of each.
async fn assigned(c: &Cluster, ids: &[TaskId]) -> Vec<(TaskId, i32, omoi::domain::AgentId)> {
    let pool = c.env.pool.clone();
    let ids = ids.to_vec();
    eventually(Duration::from_secs(20), "tasks assigned", || {
        let (pool, ids) = (pool.clone(), ids.clone());
        async move {
            let mut out = Vec::new();
            for id in &ids {
                let t = omoi::db::tasks::get(&pool, *id).await.unwrap();
                if t.status != TaskStatus::Assigned {
                    return None;
                }
                out.push((t.id, t.attempt, t.agent_id.unwrap()));
            }
            Some(out)
        }
    })
    .await
}

async fn publish_report(c: &Cluster, report: &TaskReport) {
    c.env
        .js
        .publish(
            c.env.names.result(report.agent_id, report.task_id),
            serde_json::to_vec(report).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn task_status(c: &Cluster, id: TaskId) -> omoi::protocol::workflows::TaskRecord {
    omoi::db::tasks::get(&c.env.pool, id).await.unwrap()
}

#[tokio::test]
async fn a_late_started_report_dates_the_start_back_but_never_before_the_assignment() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    register(&http, "late", &["x"]).await;
    let wf = c
        .submit(json!({"name": "late", "tasks": [
            {"key": "honest", "capabilities": ["x"]},
            {"key": "boastful", "capabilities": ["x"]}]}))
        .await;
    let held = assigned(&c, &[wf.tasks["honest"], wf.tasks["boastful"]]).await;
    let assigned_at = task_status(&c, wf.tasks["boastful"]).await.updated_at;
    // Both attempts have now been assigned for more than the 400 ms the first one claims.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (h, running_ms) in held.iter().zip([400, 86_400_000]) {
        let report = TaskReport {
            v: 1,
            task_id: h.0,
            attempt: h.1,
            agent_id: h.2,
            outcome: Outcome::Started {
                running_ms: Some(running_ms),
            },
        };
        publish_report(&c, &report).await;
    }
    let cluster = &c;
    for id in [wf.tasks["honest"], wf.tasks["boastful"]] {
        eventually(Duration::from_secs(20), "started", || async move {
            (task_status(cluster, id).await.status == TaskStatus::Running).then_some(())
        })
        .await;
    }
    let honest = task_status(&c, wf.tasks["honest"]).await;
    let started = honest.started_at.unwrap();
    assert_eq!(
        (honest.updated_at - started).num_milliseconds(),
        400,
        "started_at is the report's time less running_ms"
    );
    let boastful = task_status(&c, wf.tasks["boastful"]).await;
    assert_eq!(
        boastful.started_at,
        Some(assigned_at),
        "never before the assignment"
    );
}

#[tokio::test]
async fn a_completion_without_started_dates_the_start_back_by_its_running_time() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    register(&http, "quick", &["x"]).await;
    let wf = c
        .submit(json!({"name": "quick", "tasks": [
            {"key": "honest", "capabilities": ["x"]},
            {"key": "boastful", "capabilities": ["x"]},
            {"key": "silent", "capabilities": ["x"]}]}))
        .await;
    let keys = ["honest", "boastful", "silent"];
    let ids: Vec<TaskId> = keys.iter().map(|k| wf.tasks[*k]).collect();
    let held = assigned(&c, &ids).await;
    let assigned_at = task_status(&c, wf.tasks["boastful"]).await.updated_at;
    // Each attempt has now been assigned for more than the 400 ms the first one claims.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (h, running_ms) in held.iter().zip([Some(400), Some(86_400_000), None]) {
        let report = TaskReport {
            v: 1,
            task_id: h.0,
            attempt: h.1,
            agent_id: h.2,
            outcome: Outcome::Completed {
                output: json!({}),
                lock_wait_ms: None,
                running_ms,
            },
        };
        publish_report(&c, &report).await;
    }
    let cluster = &c;
    for id in &ids {
        eventually(Duration::from_secs(20), "completed", || async move {
            (task_status(cluster, *id).await.status == TaskStatus::Completed).then_some(())
        })
        .await;
    }
    let honest = task_status(&c, wf.tasks["honest"]).await;
    assert_eq!(
        (honest.finished_at.unwrap() - honest.started_at.unwrap()).num_milliseconds(),
        400,
        "started_at is the completion's time less running_ms"
    );
    let boastful = task_status(&c, wf.tasks["boastful"]).await;
    assert_eq!(
        boastful.started_at,
        Some(assigned_at),
        "never before the assignment"
    );
    let silent = task_status(&c, wf.tasks["silent"]).await;
    assert_eq!(
        silent.started_at, silent.finished_at,
        "not said: at the completion"
    );
}

#[tokio::test]
async fn a_nul_in_one_output_fails_that_attempt_alone_and_its_batch_applies() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    register(&http, "fake", &["x"]).await;
    let wf = c
        .submit(
            json!({"name": "nul", "failure_policy": "continue", "tasks": [
            {"key": "bad", "capabilities": ["x"], "max_attempts": 1},
            {"key": "good", "capabilities": ["x"], "max_attempts": 1}]}),
        )
        .await;
    let held = assigned(&c, &[wf.tasks["bad"], wf.tasks["good"]]).await;
    let report = |(task_id, attempt, agent_id): (TaskId, i32, _), outcome| TaskReport {
        v: 1,
        task_id,
        attempt,
        agent_id,
        outcome,
    };
    for h in &held {
        publish_report(&c, &report(*h, Outcome::Started { running_ms: None })).await;
    }
    // Published back to back: most often applied as one batch.
    publish_report(
        &c,
        &report(
            held[0],
            Outcome::Completed {
                output: json!({"stdout": "a\u{0}b"}),
                lock_wait_ms: None,
                running_ms: None,
            },
        ),
    )
    .await;
    publish_report(
        &c,
        &report(
            held[1],
            Outcome::Completed {
                output: json!({"ok": true}),
                lock_wait_ms: None,
                running_ms: None,
            },
        ),
    )
    .await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(20)).await;
    let bad = crate::cluster::task(&view, "bad");
    let good = crate::cluster::task(&view, "good");
    assert_eq!(good.status, TaskStatus::Completed, "{good:?}");
    assert_eq!(bad.status, TaskStatus::Failed, "{bad:?}");
    let error = bad.error.clone().unwrap_or_default();
    assert!(
        error.contains("U+0000") && error.contains("$.stdout"),
        "{error}"
    );
    // The report as sent is kept, with the reason.
    let letters = dead_letters(&c).await;
    assert!(
        letters.iter().any(
            |(subject, reason, payload)| subject.contains(".deadletter.result.")
                && reason.contains("U+0000")
                && String::from_utf8_lossy(payload).contains("\\u0000")
        ),
        "{letters:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn reports_with_an_unsupported_version_are_dead_lettered_never_applied() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    register(&http, "fake", &["x"]).await;
    let wf = c
        .submit(json!({"name": "v", "tasks": [{"key": "a", "capabilities": ["x"]}]}))
        .await;
    let held = assigned(&c, &[wf.tasks["a"]]).await[0];
    for v in [0, 2, 99] {
        let forged = TaskReport {
            v,
            task_id: held.0,
            attempt: held.1,
            agent_id: held.2,
            outcome: Outcome::Completed {
                output: json!({"forged": v}),
                lock_wait_ms: None,
                running_ms: None,
            },
        };
        publish_report(&c, &forged).await;
    }
    let letters = eventually(Duration::from_secs(10), "three dead letters", || async {
        let l = dead_letters(&c).await;
        (l.len() >= 3).then_some(l)
    })
    .await;
    assert!(
        letters
            .iter()
            .all(|(_, reason, _)| reason.contains("unsupported protocol version")),
        "{letters:?}"
    );
    let t = task_status(&c, held.0).await;
    assert_eq!(t.status, TaskStatus::Assigned, "{t:?}");
    // The real agent's v1 report still counts.
    publish_report(
        &c,
        &TaskReport {
            v: 1,
            task_id: held.0,
            attempt: held.1,
            agent_id: held.2,
            outcome: Outcome::Completed {
                output: json!({"real": true}),
                lock_wait_ms: None,
                running_ms: None,
            },
        },
    )
    .await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(20)).await;
    assert_eq!(
        crate::cluster::task(&view, "a").output,
        Some(json!({"real": true}))
    );
    c.stop().await;
}

/// A NATS request, answered: the reply's error code, or `None` on success.
async fn nats_error(c: &Cluster, subject: String, body: Vec<u8>) -> Option<String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        c.env.nats.request(subject.clone(), body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject}"))
    .unwrap_or_else(|e| panic!("request on {subject}: {e}"));
    let v: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
    v["error"]["code"].as_str().map(str::to_string)
}

#[tokio::test]
async fn nul_characters_are_refused_at_every_edge_with_a_validation_error() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let alice = register(&http, "alice", &["x"]).await;
    let bob = register(&http, "bob", &["x"]).await;
    let (_, thread) = http
        .post(
            "/api/v1/collaboration/threads",
            &json!({"thread_type": "discussion", "participants": [alice, bob]}),
        )
        .await;
    let thread = thread["id"].as_str().unwrap().to_string();
    let nul = "a\u{0}b";
    let posts = [
        (
            "/api/v1/workflows".to_string(),
            json!({"name": "w", "tasks": [{"key": "a", "input": {"k": nul}}]}),
        ),
        (
            "/api/v1/workflows".to_string(),
            json!({"name": nul, "tasks": [{"key": "a"}]}),
        ),
        (
            "/api/v1/agents/register".to_string(),
            json!({"name": "n", "capabilities": ["x"], "metadata": {nul: 1}}),
        ),
        (
            "/api/v1/collaboration/messages".to_string(),
            json!({"thread_id": thread, "sender_id": alice, "content": nul}),
        ),
        (
            "/api/v1/collaboration/threads".to_string(),
            json!({"thread_type": "discussion", "participants": [alice], "title": nul}),
        ),
        (
            "/api/v1/workflows/from-pattern".to_string(),
            json!({"source": nul}),
        ),
    ];
    for (path, body) in &posts {
        let (status, reply) = http.post(path, body).await;
        assert_eq!(status, 400, "{path} {body}: {reply}");
        assert_eq!(reply["error"]["code"], "validation", "{path}: {reply}");
    }
    let (status, reply) = http
        .patch(
            &format!("/api/v1/agents/{alice}"),
            &json!({"metadata": {"k": nul}}),
        )
        .await;
    assert_eq!(status, 400, "{reply}");
    for path in [
        "/api/v1/locks/%00".to_string(),
        "/api/v1/collaboration/threads?status=%00".to_string(),
        format!("/api/v1/collaboration/threads/{thread}/close?status=a%00"),
    ] {
        let (status, reply) = if path.contains("/locks/") {
            http.delete(&path).await
        } else if path.contains("/close") {
            http.post(&path, &json!({})).await
        } else {
            http.get(&path).await
        };
        assert_eq!(status, 400, "{path}: {reply}");
    }
    let (status, reply) = http.delete("/api/v1/locks/a%01b").await;
    assert_eq!(status, 400, "a control character in a lock name: {reply}");
    // Over NATS.
    let ns = c.env.names.namespace().to_string();
    for (subject, body) in [
        (
            format!("{ns}.workflow.submit"),
            json!({"name": "w", "tasks": [{"key": "a", "input": [nul]}]}),
        ),
        (
            c.env
                .names
                .act(alice.parse().unwrap(), omoi::bus::names::ACT_SEND),
            json!({"thread_id": thread, "sender_id": alice, "content": nul}),
        ),
        (
            format!("{ns}.workflow.run"),
            json!({"pattern": "map_reduce", "params": {"x": nul}}),
        ),
    ] {
        let code = nats_error(&c, subject.clone(), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(code.as_deref(), Some("validation"), "{subject}");
    }
    // Nothing of it was stored.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM workflows")
        .fetch_one(&c.env.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    c.stop().await;
}

#[tokio::test]
async fn an_out_of_range_ttl_is_refused_and_the_endpoint_keeps_answering() {
    let c = Cluster::start_with(patient).await;
    let http = c.http();
    let alice = register(&http, "alice", &["x"]).await;
    let bob = register(&http, "bob", &["x"]).await;
    let wf = c
        .submit(json!({"name": "h", "tasks": [{"key": "a", "capabilities": ["x"]}]}))
        .await;
    let task = wf.tasks["a"];
    let body = json!({"task_id": task, "from_agent_id": alice, "to_agent_id": bob,
                      "reason": "r", "ttl_seconds": 10_000_000_000_000u64});
    let subject = c
        .env
        .names
        .act(alice.parse().unwrap(), omoi::bus::names::ACT_HANDOFF);
    for _ in 0..3 {
        let code = nats_error(&c, subject.clone(), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(code.as_deref(), Some("validation"));
    }
    let (status, reply) = http
        .post("/api/v1/collaboration/handoff/request", &body)
        .await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["field"], "ttl_seconds");
    // The endpoint still serves a good request.
    let good = json!({"task_id": task, "from_agent_id": alice, "to_agent_id": bob,
                      "reason": "r", "ttl_seconds": 60});
    assert_eq!(
        nats_error(&c, subject, serde_json::to_vec(&good).unwrap()).await,
        None
    );
    c.stop().await;
}

#[tokio::test]
async fn unsupported_versions_and_oversized_names_get_bounded_error_replies() {
    let c = Cluster::start().await;
    let ns = c.env.names.namespace().to_string();
    for v in [0, 2, 99] {
        let body = json!({"v": v, "name": "w", "tasks": [{"key": "a"}]});
        let code = nats_error(
            &c,
            format!("{ns}.workflow.submit"),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        assert_eq!(code.as_deref(), Some("validation"), "v {v}");
    }
    let long = "p".repeat(600_000);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        c.env.nats.request(
            format!("{ns}.workflow.run"),
            serde_json::to_vec(&json!({"pattern": long}))
                .unwrap()
                .into(),
        ),
    )
    .await
    .expect("a reply, not a timeout")
    .unwrap();
    assert!(reply.payload.len() < 4_096, "{} bytes", reply.payload.len());
    let http = c.http();
    let (status, body) = http
        .post(
            "/api/v1/workflows/from-pattern",
            &json!({"pattern": "x".repeat(600_000)}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body.to_string().len() < 4_096);
    // A pattern name never resolves to a file of the control plane's working directory.
    let (status, body) = http
        .post(
            "/api/v1/workflows/from-pattern",
            &json!({"pattern": "Dockerfile"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.to_string().contains("FROM"), "{body}");
    c.stop().await;
}

/// POSTs `size` bytes of a JSON string in chunks (no declared length), tolerating the server
/// closing early, and returns its answer.
async fn chunked_post(addr: std::net::SocketAddr, token: &str, path: &str, size: usize) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = "x".repeat(64 * 1024);
    let mut sent = 0;
    let _ = s.write_all(b"2\r\n[\"\r\n").await;
    while sent < size {
        let frame = format!("{:x}\r\n{chunk}\r\n", chunk.len());
        if s.write_all(frame.as_bytes()).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = s.write_all(b"2\r\n\"]\r\n0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `head` (request line and headers) and reads the answer without sending a body.
async fn head_only(addr: std::net::SocketAddr, head: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_it_is_read_and_health_stays_ready() {
    let c = Cluster::start_with(|s| s.http_max_body_bytes = 1024 * 1024).await;
    let addr = c.http_addr.unwrap();
    let answer = head_only(
        addr,
        "POST /api/v1/workflows HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 31457280\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too_large"), "{answer}");
    // A body over the limit without a declared length is cut off as it is read.
    let answer = chunked_post(
        addr,
        &c.env.admin_token,
        "/api/v1/workflows",
        2 * 1024 * 1024,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let http = c.http();
    let (status, _) = http.get("/readyz").await;
    assert_eq!(status, 200);
    c.stop().await;
}

#[tokio::test]
async fn idle_and_slow_clients_are_disconnected_after_the_header_timeout() {
    let c = Cluster::start_with(|s| s.http_header_timeout_ms = 500).await;
    let addr = c.http_addr.unwrap();
    let mut open = Vec::new();
    for i in 0..40 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            // Slow: a request line and half the headers, then nothing.
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
                .await
                .unwrap();
        }
        open.push(s);
    }
    for mut s in open {
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            let mut b = [0u8; 1024];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "an idle or slow connection stayed open");
    }
    let (status, _) = c.http().get("/healthz").await;
    assert_eq!(status, 200);
    c.stop().await;
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_on_arrival() {
    let c = Cluster::start_with(|s| {
        s.http_max_connections = 10;
        s.http_header_timeout_ms = 60_000;
    })
    .await;
    let addr = c.http_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Each held connection is accepted (served) before the next test connection is made.
    let http = c.http();
    let answer = head_only(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        answer, "",
        "the 11th connection is closed without an answer"
    );
    drop(held);
    let (status, _) = eventually(
        Duration::from_secs(10),
        "a free connection slot",
        || async {
            let r = http.get_text("/healthz").await;
            (r.0 == 200).then_some(r)
        },
    )
    .await;
    assert_eq!(status, 200);
    c.stop().await;
}

async fn agent_of(c: &Cluster, name: &str) -> omoi::domain::AgentId {
    omoi::db::agents::get_live_by_name(&c.env.pool, name)
        .await
        .unwrap()
        .expect("agent registered")
        .id
}

#[tokio::test]
async fn a_worker_dead_letters_dispatches_not_addressed_to_its_agent_or_of_another_version() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "echo", 2).await;
    let me = agent_of(&c, "w").await;
    let dispatch = |agent: omoi::domain::AgentId, v: u32| {
        json!({"v": v, "task_id": TaskId::new(), "workflow_id": omoi::domain::WorkflowId::new(),
               "key": "k", "attempt": 1, "agent_id": agent, "executor": "echo", "input": {}})
    };
    for body in [dispatch(omoi::domain::AgentId::new(), 1), dispatch(me, 99)] {
        c.env
            .js
            .publish(c.env.names.dispatch(me), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let letters = eventually(Duration::from_secs(20), "two dead dispatches", || async {
        let l = dead_letters(&c).await;
        (l.len() >= 2).then_some(l)
    })
    .await;
    let reasons: Vec<&str> = letters.iter().map(|(_, r, _)| r.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("reached agent")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unsupported protocol version")),
        "{reasons:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_command_writing_more_than_the_output_limit_fails_its_attempt() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("w", "shell", 1).await;
    let wf = c
        .submit(
            json!({"name": "flood", "tasks": [{"key": "a", "executor": "shell",
            "capabilities": ["shell"], "max_attempts": 1,
            "input": {"command": "head -c 3000000 /dev/zero | tr '\\0' a"}}]}),
        )
        .await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    let a = crate::cluster::task(&view, "a");
    assert_eq!(a.status, TaskStatus::Failed);
    assert!(
        a.error
            .as_deref()
            .unwrap_or_default()
            .contains("more than 1048576 bytes"),
        "{:?}",
        a.error
    );
    c.stop().await;
}

#[tokio::test]
async fn a_worker_whose_only_agent_is_deregistered_stops_instead_of_coming_back() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "echo", 1).await;
    let id = agent_of(&c, "w").await;
    let (status, _) = c.http().delete(&format!("/api/v1/agents/{id}")).await;
    assert_eq!(status, 200);
    let mut child = c.workers.remove("w").unwrap();
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    assert!(
        matches!(exited, Ok(Ok(_))),
        "the worker kept running: {exited:?}"
    );
    let again = omoi::db::agents::get_live_by_name(&c.env.pool, "w")
        .await
        .unwrap();
    assert!(again.is_none(), "the agent came back: {again:?}");
    c.stop().await;
}

/// Malformed, hostile and careless bodies, each sent to every subject omoi reads.
fn malformed_payloads() -> Vec<Vec<u8>> {
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"42".to_vec(),
        b"\"text\"".to_vec(),
        br#"{"v": 99}"#.to_vec(),
        br#"{"v": "one"}"#.to_vec(),
        br#"{"agent_id": 5, "task_id": [], "name": {}}"#.to_vec(),
        br#"{"name": "a\u0000b", "content": "\u0000"}"#.to_vec(),
        deep.into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x80],
        format!("{{\"name\": \"{}\"}}", "n".repeat(900_000)).into_bytes(),
    ]
}

#[tokio::test]
async fn a_sweep_of_malformed_messages_over_every_subject_gets_replies_or_dead_letters_and_nothing_falls_over()
 {
    let mut c = Cluster::without_control_plane().await;
    let mut coordinator = c.spawn_coordinator();
    let inbox_dir = tempfile::tempdir().unwrap();
    let dir = inbox_dir.path().to_str().unwrap().to_string();
    c.spawn_worker_with(
        "sweeper",
        "echo",
        2,
        &[("OMOI_WORKER_INBOX_DIR", dir.as_str())],
    )
    .await;
    let agent = agent_of(&c, "sweeper").await;
    let names = &c.env.names;
    // Request/reply: every one answers with an error.
    let mut requests: Vec<String> = omoi::bus::names::ACT_VERBS
        .iter()
        .map(|v| names.act(agent, v))
        .collect();
    requests.extend(["search", "best_fit"].iter().map(|v| names.registry(v)));
    requests.extend(
        omoi::bus::names::WORKFLOW_VERBS
            .iter()
            .map(|v| names.workflow_endpoint(v)),
    );
    let payloads = malformed_payloads();
    for subject in &requests {
        for body in &payloads {
            let reply = tokio::time::timeout(
                Duration::from_secs(15),
                c.env.nats.request(subject.clone(), body.clone().into()),
            )
            .await
            .unwrap_or_else(|_| panic!("no reply on {subject}"))
            .unwrap_or_else(|e| panic!("{subject}: {e}"));
            let v: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
            let code = v["error"]["code"].as_str().unwrap_or_default().to_string();
            assert!(
                [
                    "malformed",
                    "validation",
                    "forbidden",
                    "not_found",
                    "unknown_agent"
                ]
                .contains(&code.as_str()),
                "{subject} answered {} to {:?}",
                crate::hostile::short(&reply.payload),
                crate::hostile::short(body)
            );
            assert!(reply.payload.len() < 8_192, "{subject}: a bounded error");
        }
    }
    // Streams omoi consumes: each bad message is dead-lettered with a reason.
    let streamed = [
        names.result(agent, TaskId::new()),
        names.dispatch(agent),
        names.inbox(agent),
    ];
    let mut sent = 0;
    for subject in &streamed {
        for body in &payloads {
            if body.len() > 500_000 {
                continue; // kept under the stream's message size
            }
            c.env
                .js
                .publish(subject.clone(), body.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
            sent += 1;
        }
    }
    let letters = eventually(
        Duration::from_secs(60),
        "every bad message dead-lettered",
        || async {
            let l = dead_letters(&c).await;
            (l.len() >= sent).then_some(l)
        },
    )
    .await;
    for (subject, reason, _) in &letters {
        assert!(
            !reason.is_empty(),
            "{subject} dead-lettered without a reason"
        );
    }
    // Event subjects omoi listens to as notifications: bad ones are ignored.
    for kind in [
        "task.cancelled",
        "task.ready",
        "workflow.created",
        "agent.registered",
    ] {
        for body in &payloads {
            if body.len() < 500_000 {
                c.env
                    .nats
                    .publish(names.event(kind), body.clone().into())
                    .await
                    .unwrap();
            }
        }
    }
    c.env.nats.flush().await.unwrap();
    // Everyone is still up and works.
    assert!(
        coordinator.try_wait().unwrap().is_none(),
        "the control plane died"
    );
    let worker = c.workers.get_mut("sweeper").unwrap();
    assert!(worker.try_wait().unwrap().is_none(), "the worker died");
    c.run(
        json!({"name": "after", "tasks": [{"key": "a"}, {"key": "b", "depends_on": ["a"]}]}),
        Duration::from_secs(30),
    )
    .await;
    c.stop().await;
    let _ = coordinator.kill().await;
}

/// A short, printable view of a payload for assertion messages.
pub fn short(bytes: &[u8]) -> String {
    omoi::domain::text::bounded(&String::from_utf8_lossy(bytes), 120)
}

#[tokio::test]
async fn a_forged_cancel_on_an_open_server_does_not_strand_the_task() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "echo", 1).await;
    // Long enough never to finish by itself during the test.
    let wf = c
        .submit(
            json!({"name": "forged", "tasks": [{"key": "slow", "executor": "sleep",
            "input": {"ms": 600_000}}]}),
        )
        .await;
    let id = wf.tasks["slow"];
    let running = eventually(Duration::from_secs(20), "the task runs", || async {
        let t = task_status(&c, id).await;
        (t.status == TaskStatus::Running).then_some(t)
    })
    .await;
    // Not from the control plane: the task is not cancelled at all.
    let forged = omoi::protocol::Envelope::new(omoi::protocol::Event::TaskCancelled(
        omoi::protocol::events::TaskEvent {
            task_id: id,
            workflow_id: wf.workflow_id,
            key: "slow".into(),
            status: TaskStatus::Cancelled,
            attempt: running.attempt,
            agent_id: running.agent_id,
            error: None,
            retry_at: None,
            lock_wait_ms: None,
        },
    ));
    c.env
        .nats
        .publish(
            c.env.names.event("task.cancelled"),
            serde_json::to_vec(&forged).unwrap().into(),
        )
        .await
        .unwrap();
    // The worker stopped it and handed it back; it is dispatched again, not stranded.
    // (An attempt rises only when a ready task is assigned again.)
    eventually(
        Duration::from_secs(30),
        "the task dispatched again",
        || async {
            let t = task_status(&c, id).await;
            (t.attempt > running.attempt && t.status.occupies_agent()).then_some(())
        },
    )
    .await;
    c.client.cancel(wf.workflow_id).await.unwrap();
    c.stop().await;
}

#[tokio::test]
async fn a_large_submission_under_a_burst_of_requests_starves_neither_the_pool_nor_readiness() {
    let c = Cluster::start().await;
    let addr = c.http_addr.unwrap();
    let token = c.env.admin_token.clone();
    let tasks: Vec<Value> = (0..20_000)
        .map(|i| json!({"key": format!("t{i}"), "capabilities": ["nobody"], "input": {"i": i}}))
        .collect();
    let big = json!({"name": "big", "tasks": tasks});
    let submit = {
        let token = token.clone();
        tokio::spawn(async move {
            Http::with_token(addr, &token)
                .post("/api/v1/workflows", &big)
                .await
                .0
        })
    };
    let burst: Vec<_> = (0..300)
        .map(|i| {
            let token = token.clone();
            tokio::spawn(async move {
                let http = Http::with_token(addr, &token);
                let path = if i % 2 == 0 {
                    "/api/v1/agents/statistics"
                } else {
                    "/api/v1/workflows?limit=5"
                };
                http.get(path).await.0
            })
        })
        .collect();
    let ready = tokio::spawn(async move {
        let http = Http::new(addr);
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(http.get("/readyz").await.0);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        statuses
    });
    let mut answered = Vec::new();
    for b in burst {
        answered.push(b.await.unwrap());
    }
    assert!(
        answered.iter().all(|s| *s == 200 || *s == 503),
        "every request is served or shed, never failed: {answered:?}"
    );
    assert!(answered.iter().filter(|s| **s == 200).count() > 0);
    assert_eq!(
        submit.await.unwrap(),
        201,
        "the large submission is accepted"
    );
    let ready = ready.await.unwrap();
    assert!(
        ready.iter().all(|s| *s == 200),
        "readiness stayed: {ready:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_raw_character_no_url_may_hold_is_answered_in_json_not_with_an_empty_400() {
    let c = Cluster::start().await;
    let addr = c.http_addr.unwrap();
    // The documented form once, written the way curl sends it.
    let answer = head_only(
        addr,
        "GET /api/v1/ws/events?types=task.> HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "malformed", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("%3E"),
        "{body}"
    );
    // A valid target still goes through, on the same server.
    let answer = head_only(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The second request of a keep-alive connection, and a request line that arrives in two
    // pieces, are answered in JSON too — and so is a header hyper cannot read.
    let json_400 = |answer: String| {
        let tail = answer
            .rsplit("HTTP/1.1 ")
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(tail.starts_with("400"), "{answer}");
        let body: Value = serde_json::from_str(tail.split("\r\n\r\n").nth(1).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(body["error"]["code"], "malformed", "{body}");
        body
    };
    let answer = head_only(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /api/v1/ws/events?types=task.> HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = json_400(answer);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("%3E"),
        "{body}"
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/v1/ws/events?types=ta")
        .await
        .unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"sk.> HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    json_400(String::from_utf8_lossy(&out).into_owned());
    json_400(head_only(addr, "GET /healthz HTTP/1.1\r\nHost t\r\n\r\n").await);
    c.stop().await;
}
