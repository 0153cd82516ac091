//! The workflow, task and lock endpoints over HTTP, and the `omoi submit` / `omoi locks` CLI.

use std::time::Duration;

use omoi::domain::{TaskStatus, WorkflowStatus};
use serde_json::json;

use crate::cluster::{Cluster, task};

#[tokio::test]
async fn submit_read_list_retry_and_inspect_locks_over_http() {
    let mut c = Cluster::start().await;
    c.spawn_worker("w", "sleep,echo", 2).await;
    let http = c.http();
    let (status, v) = http
        .post(
            "/api/v1/workflows",
            &json!({"name": "api", "failure_policy": "continue", "tasks": [
                {"key": "flaky", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 5, "fail": true}, "max_attempts": 1},
                {"key": "after", "depends_on": ["flaky"]},
                {"key": "hold", "executor": "sleep", "capabilities": ["sleep"], "input": {"ms": 1500},
                 "resources": [{"name": "repo:api"}]}
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let wf = v["workflow_id"].as_str().unwrap().to_string();
    let flaky = v["tasks"]["flaky"].as_str().unwrap().to_string();

    // While `hold` runs, its lock is listed.
    let locks = crate::env::eventually(Duration::from_secs(10), "lock listed", || async {
        let (_, l) = http.get("/api/v1/locks").await;
        (l.as_array().is_some_and(|a| !a.is_empty())).then_some(l)
    })
    .await;
    assert_eq!(locks[0]["name"], "repo:api");
    assert_eq!(locks[0]["lock"]["holders"].as_array().unwrap().len(), 1);

    let view = c.wait(wf.parse().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(view.workflow.status, WorkflowStatus::Failed);
    let (status, t) = http.get(&format!("/api/v1/tasks/{flaky}")).await;
    assert_eq!((status, t["status"].as_str()), (200, Some("failed")));
    let (status, list) = http.get("/api/v1/workflows?limit=5").await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["id"], json!(wf));

    // Retry: the task and its failed dependant run again; it fails again (fail=true) but the
    // retry was real: a new attempt.
    let (status, r) = http
        .post(&format!("/api/v1/tasks/{flaky}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "ready");
    let view = crate::env::eventually(Duration::from_secs(20), "retried attempt", || async {
        let v = c.client.get(wf.parse().unwrap()).await.unwrap();
        (task(&v, "flaky").attempt == 2 && v.workflow.status.is_terminal()).then_some(v)
    })
    .await;
    assert_eq!(task(&view, "flaky").status, TaskStatus::Failed);
    let (status, _) = http
        .post(
            &format!("/api/v1/tasks/{}/retry", task(&view, "hold").id),
            &json!({}),
        )
        .await;
    assert_eq!(status, 409, "only failed tasks can be retried");
    let (status, _) = http
        .get("/api/v1/workflows/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(status, 404);
    let (status, doc) = http.get("/api/v1/openapi.json").await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")));
    let (status, _) = http.delete("/api/v1/locks/nothing-held").await;
    assert_eq!(status, 404);
    c.stop().await;
}

#[tokio::test]
async fn the_cli_submits_a_yaml_workflow_waits_for_it_and_lists_locks() {
    let mut c = Cluster::start().await;
    // The README's first workflow, on a worker with the default executors.
    c.spawn_worker("w", "echo", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hello.yaml");
    std::fs::write(
        &file,
        "name: hello\ntasks:\n  - {key: greet, input: {msg: hi}}\n  - {key: shout, depends_on: [greet], input: {said: \"${deps.greet.output.input.msg}\"}}\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(["submit", "--wait"])
        .arg(&file)
        .envs(c.env.child_env())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["status"], "completed");
    let shout = view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == "shout")
        .unwrap();
    assert_eq!(shout["output"]["input"]["said"], "hi");

    let bad = dir.path().join("cycle.json");
    std::fs::write(
        &bad,
        r#"{"name": "c", "tasks": [{"key": "a", "depends_on": ["a"]}]}"#,
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_omoi"))
        .arg("submit")
        .arg(&bad)
        .envs(c.env.child_env())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a → a"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_omoi"))
        .arg("locks")
        .envs(c.env.child_env())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Nothing is held: said, not left to an empty screen (stdout stays for lock lines).
    assert!(stderr.contains("no locks held"), "{stderr}");
    assert!(out.stdout.is_empty());
    c.stop().await;
}

/// `n` tasks no agent can take, padded so that the workflow's JSON passes one NATS message.
fn huge_workflow(n: usize) -> serde_json::Value {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            json!({"key": format!("t{i:05}"), "capabilities": ["nobody-has-this"],
                   "input": {"pad": "x".repeat(100)}})
        })
        .collect();
    json!({"name": "huge", "tasks": tasks})
}

/// The namespace's uploads object store.
async fn uploads(c: &Cluster) -> async_nats::jetstream::object_store::ObjectStore {
    c.env
        .js
        .get_object_store(c.env.names.bucket("uploads"))
        .await
        .unwrap()
}

async fn uploads_left(c: &Cluster) -> usize {
    use futures::StreamExt;
    uploads(c).await.list().await.unwrap().count().await
}

#[tokio::test]
async fn a_submission_too_large_for_one_message_goes_through_the_uploads_store() {
    let c = Cluster::start().await;
    let spec = huge_workflow(12_000);
    let size = serde_json::to_vec(&spec).unwrap().len();
    assert!(size > 1024 * 1024, "{size} bytes");

    // The client (over NATS, as every test client) puts it in the object store and submits it.
    let submitted = c.submit(spec.clone()).await;
    let view = c.client.view(submitted.workflow_id, false).await.unwrap();
    assert_eq!(view.counts.values().sum::<usize>(), 12_000);
    // The reply fits in a message: whole, or without the task ids, saying so.
    assert!(
        submitted.tasks_omitted || submitted.tasks.len() == 12_000,
        "{} task ids",
        submitted.tasks.len()
    );
    assert_eq!(uploads_left(&c).await, 0, "the upload is deleted once read");
    // Its tasks cannot come back in one message: refused for their number, before being read.
    match c.client.get(submitted.workflow_id).await {
        Err(omoi::client::ClientError::Remote(e))
            if e.code == omoi::protocol::ErrorCode::TooLarge =>
        {
            assert!(e.message.contains("12000 tasks"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    c.client.cancel(submitted.workflow_id).await.unwrap();

    // `omoi submit` does the same from a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.json");
    std::fs::write(&file, serde_json::to_vec(&spec).unwrap()).unwrap();
    let out = c
        .spawn_omoi(&["submit", file.to_str().unwrap()])
        .wait_with_output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let id: omoi::domain::WorkflowId =
        serde_json::from_value(reply["workflow_id"].clone()).unwrap();
    let view = c.client.view(id, false).await.unwrap();
    assert_eq!(view.counts.values().sum::<usize>(), 12_000);
    c.client.cancel(id).await.unwrap();
    c.stop().await;
}

#[tokio::test]
async fn an_upload_missing_too_large_or_not_a_workflow_gets_a_clear_error_and_is_deleted() {
    use omoi::protocol::ErrorCode;
    let c = Cluster::start_with(|s| s.http_max_body_bytes = 64 * 1024).await;
    let store = uploads(&c).await;
    let ask = |object: &str| {
        let (nats, subject) = (
            c.env.nats.clone(),
            c.env.names.workflow_endpoint("submit_upload"),
        );
        let body = json!({"object": object});
        async move {
            omoi::client::request::<_, serde_json::Value>(
                &nats,
                subject,
                &body,
                Duration::from_secs(20),
            )
            .await
        }
    };
    let err = ask("never-put").await.unwrap_err().to_string();
    assert!(err.contains("no upload `never-put`"), "{err}");

    let big = serde_json::to_vec(&huge_workflow(1_000)).unwrap();
    store.put("big", &mut big.as_slice()).await.unwrap();
    match ask("big").await {
        Err(omoi::client::ClientError::Remote(e)) if e.code == ErrorCode::TooLarge => {
            assert!(e.message.contains("at most 65536 bytes"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    store.put("junk", &mut &b"[1, 2, 3]"[..]).await.unwrap();
    assert_eq!(
        ask("junk").await.map(|_| ()).unwrap_err().code(),
        Some(ErrorCode::Malformed)
    );
    let cyclic = json!({"name": "loop", "tasks": [
        {"key": "a", "depends_on": ["b"]}, {"key": "b", "depends_on": ["a"]}]});
    store
        .put(
            "cyclic",
            &mut serde_json::to_vec(&cyclic).unwrap().as_slice(),
        )
        .await
        .unwrap();
    assert_eq!(
        ask("cyclic").await.map(|_| ()).unwrap_err().code(),
        Some(ErrorCode::Validation)
    );
    // An object whose meta names a digest its chunks do not have (forged, or torn): a clear
    // refusal, not "unavailable" (which tells a client to try the same again).
    let ok = json!({"name": "fine", "tasks": [{"key": "a"}]});
    let info = store
        .put("forged", &mut serde_json::to_vec(&ok).unwrap().as_slice())
        .await
        .unwrap();
    let mut meta = serde_json::to_value(&info).unwrap();
    meta["digest"] = json!("SHA-256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    c.env
        .js
        .publish_with_headers(
            // The meta subject names the object in URL-safe base64: "forged" → "Zm9yZ2Vk".
            format!("$O.{}.M.Zm9yZ2Vk", c.env.names.bucket("uploads")),
            headers,
            serde_json::to_vec(&meta).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    match ask("forged").await {
        Err(omoi::client::ClientError::Remote(e)) if e.code == ErrorCode::Validation => {
            assert!(e.message.contains("digest"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(uploads_left(&c).await, 0, "every upload read is deleted");
    c.stop().await;
}
