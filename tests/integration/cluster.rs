//! A control plane (in this process, or as a child process) plus `omoi worker` child processes.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use omoi::client::WorkflowClient;
use omoi::domain::dag::WorkflowSpec;
use omoi::domain::{WorkflowId, WorkflowStatus};
use omoi::protocol::workflows::{Submitted, TaskRecord, WorkflowView};
use omoi::runtime::Shutdown;
use tokio::process::{Child, Command};

use crate::env::{TestEnv, eventually};

pub struct Cluster {
    pub env: TestEnv,
    pub control_plane: Option<Shutdown>,
    pub http_addr: Option<std::net::SocketAddr>,
    pub workers: HashMap<String, Child>,
    pub client: WorkflowClient,
}

impl Cluster {
    /// A cluster whose control plane runs in this process.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`Cluster::start`] with the control plane's settings changed by `tune`.
    pub async fn start_with(tune: impl FnOnce(&mut omoi::config::Settings)) -> Self {
        Self::start_in(TestEnv::new().await, tune).await
    }

    /// [`Cluster::start_with`] in the environment `env`.
    pub async fn start_in(env: TestEnv, tune: impl FnOnce(&mut omoi::config::Settings)) -> Self {
        let shutdown = Shutdown::new();
        let mut settings = env.settings();
        tune(&mut settings);
        let running = omoi::coordinator::start(&settings, &shutdown)
            .await
            .unwrap();
        let client = WorkflowClient::new(env.nats.clone(), env.names.clone());
        let cluster = Self {
            env,
            control_plane: Some(shutdown),
            http_addr: Some(running.http_addr),
            workers: HashMap::new(),
            client,
        };
        let leader = running.leader.clone();
        // A condition, not a margin: on a loaded machine (or with R3 buckets on a three-node
        // cluster) taking the lease can take seconds.
        eventually(Duration::from_secs(30), "leadership", || {
            let l = *leader.borrow();
            async move { l.then_some(()) }
        })
        .await;
        cluster
    }

    /// An HTTP client of the in-process control plane, with the admin token.
    pub fn http(&self) -> crate::http::Http {
        crate::http::Http::with_token(
            self.http_addr.expect("an in-process control plane"),
            &self.env.admin_token,
        )
    }

    /// A WebSocket to the in-process control plane (`path` with its query), with the admin
    /// token as a bearer header.
    pub async fn ws(
        &self,
        path: &str,
    ) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}{path}", self.http_addr.expect("a control plane"));
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.env.admin_token).parse().unwrap(),
        );
        tokio_tungstenite::connect_async(req).await.unwrap().0
    }

    /// A cluster with no control plane yet (see [`Cluster::spawn_coordinator`]).
    pub async fn without_control_plane() -> Self {
        let env = TestEnv::new().await;
        let client = WorkflowClient::new(env.nats.clone(), env.names.clone());
        Self {
            env,
            control_plane: None,
            http_addr: None,
            workers: HashMap::new(),
            client,
        }
    }

    /// An `omoi coordinator` child process.
    pub fn spawn_coordinator(&self) -> Child {
        self.spawn_coordinator_with(&[])
    }

    /// An `omoi coordinator` child process with some settings changed (`OMOI_*` variables).
    pub fn spawn_coordinator_with(&self, overrides: &[(&str, &str)]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_omoi"))
            .arg("coordinator")
            .envs(self.env.child_env())
            .envs(
                overrides
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn omoi coordinator")
    }

    /// `omoi <args>` as a child process of this environment, its stdout and stderr piped.
    pub fn spawn_omoi(&self, args: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_omoi"))
            .args(args)
            .envs(self.env.child_env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn omoi")
    }

    /// Starts an `omoi worker` process hosting one agent and waits until it is registered.
    pub async fn spawn_worker(&mut self, name: &str, capabilities: &str, capacity: u32) {
        self.spawn_worker_with(name, capabilities, capacity, &[])
            .await;
    }

    /// [`Cluster::spawn_worker`] for a worker that also offers the `shell` executor.
    pub async fn spawn_shell_worker(&mut self, name: &str, capabilities: &str, capacity: u32) {
        self.spawn_worker_with(
            name,
            capabilities,
            capacity,
            &[("OMOI_WORKER_EXECUTORS", "echo,sleep,shell")],
        )
        .await;
    }

    /// [`Cluster::spawn_worker`] with extra environment variables.
    pub async fn spawn_worker_with(
        &mut self,
        name: &str,
        capabilities: &str,
        capacity: u32,
        env: &[(&str, &str)],
    ) {
        let child = Command::new(env!("CARGO_BIN_EXE_omoi"))
            .args([
                "worker",
                "--agent",
                name,
                "--capabilities",
                capabilities,
                "--capacity",
            ])
            .arg(capacity.to_string())
            .envs(self.env.child_env())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn omoi worker");
        self.workers.insert(name.to_string(), child);
        let pool = self.env.pool.clone();
        let name = name.to_string();
        let agent = eventually(Duration::from_secs(20), "worker registered", || {
            let (pool, name) = (pool.clone(), name.clone());
            async move {
                omoi::db::agents::get_live_by_name(&pool, &name)
                    .await
                    .unwrap()
                    .filter(|a| a.status.is_dispatchable())
            }
        })
        .await;
        // The row exists before the registration's reply: a control plane killed in between
        // leaves a worker that must register again. It pulls from its dispatch consumer only
        // once registered, so a pull seen there means the registration was answered.
        let stream = self
            .env
            .js
            .get_stream(self.env.names.stream(omoi::bus::names::STREAM_DISPATCH))
            .await
            .unwrap();
        let consumer = format!("agent-{}", agent.id);
        eventually(
            Duration::from_secs(20),
            "worker pulling its dispatches",
            || {
                let (stream, consumer) = (stream.clone(), consumer.clone());
                async move {
                    let info = stream.consumer_info(&consumer).await.ok()?;
                    (info.num_waiting > 0 || info.delivered.consumer_sequence > 0).then_some(())
                }
            },
        )
        .await;
    }

    pub fn signal(&self, worker: &str, sig: &str) {
        let pid = self.workers[worker].id().expect("running").to_string();
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub async fn submit(&self, spec: serde_json::Value) -> Submitted {
        let spec: WorkflowSpec = serde_json::from_value(spec).unwrap();
        self.client.submit(&spec).await.unwrap()
    }

    pub async fn wait(&self, id: WorkflowId, timeout: Duration) -> WorkflowView {
        let view = self.client.wait(id, timeout).await.unwrap();
        assert!(
            view.workflow.status.is_terminal(),
            "workflow still {} after {timeout:?}: {:?}",
            view.workflow.status,
            view.counts
        );
        view
    }

    pub async fn run(&self, spec: serde_json::Value, timeout: Duration) -> WorkflowView {
        let submitted = self.submit(spec).await;
        let view = self.wait(submitted.workflow_id, timeout).await;
        assert_eq!(
            view.workflow.status,
            WorkflowStatus::Completed,
            "{:#?}",
            view.tasks
        );
        view
    }

    /// SIGTERM one worker and wait for it to exit.
    pub async fn stop_worker(&mut self, name: &str) {
        let mut child = self.workers.remove(name).expect("worker");
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "{name} did not stop cleanly: {status:?}"
        );
    }

    pub async fn stop(mut self) {
        for (_, mut child) in self.workers.drain() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        if let Some(cp) = self.control_plane.take() {
            cp.drain(Duration::from_secs(5)).await;
        }
    }
}

/// Liveness settings for tests whose agents are registered over HTTP and never heartbeat: they
/// stay live (eligible for dispatches and handoffs) for the whole test, however slow the
/// machine — not just for the default test settings' 400 ms.
pub fn patient(s: &mut omoi::config::Settings) {
    s.agent_stale_after_ms = 600_000;
    s.agent_offline_after_ms = 1_200_000;
}

/// `kill -9` of a child process, and its end awaited.
pub async fn kill9(child: &mut Child) {
    let pid = child.id().expect("running child").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    let _ = child.wait().await;
}

/// The task with `key`.
pub fn task<'a>(view: &'a WorkflowView, key: &str) -> &'a TaskRecord {
    view.tasks
        .iter()
        .find(|t| t.key == key)
        .unwrap_or_else(|| panic!("no task {key}"))
}

/// Largest number of intervals open at once.
pub fn max_overlap(
    intervals: &[(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)],
) -> usize {
    let mut points: Vec<(chrono::DateTime<chrono::Utc>, i32)> = Vec::new();
    for (s, e) in intervals {
        points.push((*s, 1));
        points.push((*e, -1));
    }
    // Ends sort before starts at the same instant: touching is not overlapping.
    points.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut open, mut max) = (0i32, 0i32);
    for (_, d) in points {
        open += d;
        max = max.max(open);
    }
    max as usize
}
