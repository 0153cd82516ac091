//! Executors are a policy of the worker: `shell` and `http` run only where enabled, tasks go
//! only to agents offering their executor, and `http` reaches only allowed addresses.

use std::time::Duration;

use omoi::domain::{TaskId, TaskStatus};
use serde_json::json;

use crate::cluster::{Cluster, task};

#[tokio::test]
async fn a_default_worker_never_runs_shell_and_a_shell_task_is_unschedulable_until_one_offers_it() {
    let mut c = Cluster::start().await;
    c.spawn_worker("plain", "echo", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let command = format!("touch {}", marker.display());
    // No capabilities: before, any agent took it.
    let wf = c
        .submit(
            json!({"name": "sh", "tasks": [{"key": "cmd", "executor": "shell",
                       "input": {"command": command}}]}),
        )
        .await;
    assert_eq!(wf.unschedulable.len(), 1, "{:?}", wf.unschedulable);
    assert_eq!(
        wf.unschedulable[0].missing_executor.as_deref(),
        Some("shell")
    );
    // The plain worker is idle and the task stays ready.
    let view = c.client.get(wf.workflow_id).await.unwrap();
    assert_eq!(task(&view, "cmd").status, TaskStatus::Ready);
    // Even a dispatch published straight to the plain worker does not run the command: the
    // worker reports the attempt failed, and the marker is never made.
    let plain = omoi::db::agents::get_live_by_name(&c.env.pool, "plain")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plain.executors, vec!["echo", "sim", "sleep"]);
    let forged_marker = dir.path().join("forged");
    let forged_task = TaskId::new();
    let mut reports = c
        .env
        .nats
        .subscribe(c.env.names.result(plain.id, forged_task))
        .await
        .unwrap();
    let forged = json!({"v": 1, "task_id": forged_task, "workflow_id": wf.workflow_id,
        "key": "forged", "attempt": 1, "agent_id": plain.id, "executor": "shell",
        "input": {"command": format!("touch {}", forged_marker.display())}});
    c.env
        .js
        .publish(c.env.names.dispatch(plain.id), forged.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = futures::StreamExt::next(&mut reports).await {
            let r: omoi::protocol::TaskReport = serde_json::from_slice(&m.payload).unwrap();
            if matches!(r.outcome, omoi::protocol::Outcome::Failed { .. }) {
                return r;
            }
        }
        panic!("subscription ended")
    })
    .await
    .expect("the forged dispatch's report");
    let omoi::protocol::Outcome::Failed { error, .. } = failed.outcome else {
        unreachable!()
    };
    assert!(error.contains("no executor `shell`"), "{error}");
    assert!(!forged_marker.exists(), "the forged command ran");
    // A worker offering shell takes the real task.
    c.spawn_shell_worker("sh", "echo", 1).await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    let cmd = task(&view, "cmd");
    assert_eq!(cmd.status, TaskStatus::Completed);
    let sh = omoi::db::agents::get_live_by_name(&c.env.pool, "sh")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cmd.agent_id, Some(sh.id));
    assert!(marker.exists());
    c.stop().await;
}

/// A TCP listener on loopback that counts the connections it accepts.
async fn counting_listener() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            use tokio::io::AsyncWriteExt;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"inside\": 1}\n")
                .await;
        }
    });
    (addr, count)
}

#[tokio::test]
async fn the_http_executor_refuses_loopback_and_private_addresses_unless_allowed() {
    let mut c = Cluster::start().await;
    c.spawn_worker_with("web", "web", 2, &[("OMOI_WORKER_EXECUTORS", "http")])
        .await;
    let (addr, accepted) = counting_listener().await;
    let targets = [
        format!("http://{addr}/"),
        format!("http://localhost:{}/", addr.port()),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.1/".to_string(),
        format!("http://[::ffff:127.0.0.1]:{}/", addr.port()),
    ];
    let tasks: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, url)| {
            json!({"key": format!("t{i}"), "executor": "http", "capabilities": ["web"],
                                "max_attempts": 1, "input": {"url": url}})
        })
        .collect();
    let wf = c
        .submit(json!({"name": "ssrf", "failure_policy": "continue", "tasks": tasks}))
        .await;
    let view = c.wait(wf.workflow_id, Duration::from_secs(30)).await;
    for t in &view.tasks {
        assert_eq!(t.status, TaskStatus::Failed, "{t:?}");
        assert!(
            t.error
                .as_deref()
                .unwrap_or_default()
                .contains("not allowed"),
            "{:?}",
            t.error
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused request reached the loopback service"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_shell_command_gets_its_task_variables_but_not_the_workers_settings() {
    let mut c = Cluster::start().await;
    c.spawn_shell_worker("sh", "shell", 1).await;
    let view = c
        .run(
            json!({"name": "env", "tasks": [{"key": "env", "executor": "shell",
                   "capabilities": ["shell"], "input": {"command": "env"}}]}),
            Duration::from_secs(30),
        )
        .await;
    let out = crate::cluster::task(&view, "env").output.clone().unwrap();
    let env = out["stdout"].as_str().unwrap();
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    for wanted in [
        "PATH",
        "OMOI_TASK_ID",
        "OMOI_TASK_KEY",
        "OMOI_ATTEMPT",
        "OMOI_AGENT",
        "OMOI_LOCK_TOKENS",
    ] {
        assert!(names.contains(&wanted), "no {wanted} in:\n{env}");
    }
    // The worker runs with every setting as an OMOI_ variable (the admin token among them).
    let leaked: Vec<&&str> = names
        .iter()
        .filter(|n| n.starts_with("OMOI_") && !n.starts_with("OMOI_TASK_"))
        .filter(|n| !["OMOI_ATTEMPT", "OMOI_AGENT", "OMOI_LOCK_TOKENS"].contains(n))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    assert!(
        !env.contains(&c.env.admin_token),
        "the admin token reached the task"
    );
    c.stop().await;
}
