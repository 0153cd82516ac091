//! A real three-node NATS cluster, run from the shipped `nats/cluster.conf` with a current
//! nats-server: `omoi migrate --replicas 3` makes every stream and bucket R3, a control plane
//! restarted without the setting keeps them so, and killing a node mid-workflow (the leader of
//! the dispatch stream) loses no task and lets no lock be held twice.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use omoi::domain::{TaskStatus, WorkflowStatus};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::cluster::{Cluster, kill9, max_overlap, task};
use crate::env::{TestEnv, eventually, free_port};

/// One node of the cluster; killed on drop.
struct Node {
    name: String,
    child: Child,
}

/// Three nodes running `nats/cluster.conf`, and the comma-separated URL of all three.
struct NatsCluster {
    nodes: Vec<Node>,
    url: String,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    async fn start() -> Self {
        let binary = crate::nats_auth::server_binary(true);
        let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/nats/cluster.conf");
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let route = |i: usize| format!("nats-route://127.0.0.1:{}", ports[i].2);
        let mut nodes = Vec::new();
        for (i, (client, monitor, cluster)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let child = Command::new(&binary)
                .args(["-c", conf])
                .env("NATS_SERVER_NAME", &name)
                .env("NATS_CLIENT_LISTEN", format!("127.0.0.1:{client}"))
                .env("NATS_MONITOR_LISTEN", format!("127.0.0.1:{monitor}"))
                .env("NATS_CLUSTER_LISTEN", format!("127.0.0.1:{cluster}"))
                .env("NATS_ROUTE_1", route(0))
                .env("NATS_ROUTE_2", route(1))
                .env("NATS_ROUTE_3", route(2))
                .env("NATS_STORE_DIR", dir.path().join(&name))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start nats-server");
            nodes.push(Node { name, child });
        }
        let url = ports
            .iter()
            .map(|(client, _, _)| format!("nats://127.0.0.1:{client}"))
            .collect::<Vec<_>>()
            .join(",");
        // Ready when the cluster has a JetStream meta leader: an R3 stream can be made.
        let servers: Vec<String> = url.split(',').map(String::from).collect();
        eventually(Duration::from_secs(60), "a JetStream cluster", || {
            let servers = servers.clone();
            async move {
                let nats = async_nats::connect(servers).await.ok()?;
                let js = jetstream::new(nats);
                js.create_stream(jetstream::stream::Config {
                    name: "probe".into(),
                    subjects: vec!["probe.>".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
                .ok()?;
                js.delete_stream("probe").await.ok().map(|_| ())
            }
        })
        .await;
        Self {
            nodes,
            url,
            _dir: dir,
        }
    }
}

/// Every stream of the namespace (buckets' and object stores' included), with its replica
/// count.
async fn replicas(env: &TestEnv) -> HashMap<String, usize> {
    let defs = omoi::bus::provision::Definitions::builtin().unwrap();
    let mut out = HashMap::new();
    for name in defs.stream_names(&env.names) {
        let stream = env.js.get_stream(&name).await.unwrap();
        out.insert(name, stream.cached_info().config.num_replicas);
    }
    out
}

/// Whether every stream of the namespace has a leader and two current followers (grown to R3,
/// the new replicas have caught up).
async fn all_replicated(env: &TestEnv) -> bool {
    let defs = omoi::bus::provision::Definitions::builtin().unwrap();
    for name in defs.stream_names(&env.names) {
        let Ok(mut stream) = env.js.get_stream(&name).await else {
            return false;
        };
        let Ok(info) = stream.info().await else {
            return false;
        };
        let healthy = info.cluster.as_ref().is_some_and(|c| {
            c.leader.is_some() && c.replicas.len() == 2 && c.replicas.iter().all(|p| p.current)
        });
        if !healthy {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_three_node_cluster_loses_a_node_mid_workflow_and_nothing_is_lost_or_double_locked() {
    let nats = NatsCluster::start().await;
    let env = TestEnv::on_nats(nats.url.clone()).await;
    assert!(replicas(&env).await.values().all(|&r| r == 1));

    // `omoi migrate --replicas 3`, as a real process.
    let migrate = Command::new(env!("CARGO_BIN_EXE_omoi"))
        .args(["migrate", "--replicas", "3"])
        .envs(env.child_env())
        .output()
        .await
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let grown = replicas(&env).await;
    assert!(grown.values().all(|&r| r == 3), "{grown:?}");
    // Growing a stream moves and elects its leader: wait until each has settled, as an
    // operator would before counting on R3.
    eventually(
        Duration::from_secs(60),
        "every stream R3 and current",
        || async { all_replicated(&env).await.then_some(()) },
    )
    .await;

    // A control plane with the default `nats_replicas` (0) keeps them at three.
    let mut c = Cluster::start_in(env, |_| {}).await;
    let kept = replicas(&c.env).await;
    assert!(kept.values().all(|&r| r == 3), "{kept:?}");
    c.spawn_shell_worker("w1", "shell", 3).await;
    c.spawn_shell_worker("w2", "shell", 3).await;

    // Forty tasks in four layers of ten; four exclusive resources; each run appends
    // "<key> <attempt> <start> <end>" (nanoseconds) to a log.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.log");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let deps = if i < 10 {
                vec![]
            } else {
                vec![format!("t{}", i - 10)]
            };
            json!({"key": format!("t{i}"), "executor": "shell", "capabilities": ["shell"],
                   "depends_on": deps, "resources": [{"name": format!("r{}", i % 4)}],
                   "input": {"command": format!(
                       "s=$(date +%s%N); sleep 0.2; e=$(date +%s%N); \
                        echo \"$OMOI_TASK_KEY $OMOI_ATTEMPT $s $e\" >> {}; echo '{{}}'",
                       log.display())}})
        })
        .collect();
    let wf = c.submit(json!({"name": "cluster", "tasks": tasks})).await;

    // A quarter done, kill -9 the node leading the dispatch stream.
    eventually(Duration::from_secs(60), "ten tasks completed", || async {
        let v = c.client.get(wf.workflow_id).await.ok()?;
        let done = v
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Completed)
            .count();
        (done >= 10).then_some(())
    })
    .await;
    let mut dispatch = c
        .env
        .js
        .get_stream(c.env.names.stream("dispatch"))
        .await
        .unwrap();
    let leader = dispatch
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|cl| cl.leader.clone())
        .expect("the dispatch stream has a leader");
    let mut nodes = nats.nodes;
    let at = nodes
        .iter()
        .position(|n| n.name == leader)
        .unwrap_or_else(|| panic!("leader {leader} is one of ours"));
    let mut killed = nodes.remove(at);
    kill9(&mut killed.child).await;

    let view = c.wait(wf.workflow_id, Duration::from_secs(240)).await;
    assert_eq!(
        view.workflow.status,
        WorkflowStatus::Completed,
        "{:?}",
        view.counts
    );
    // Every task ran, and no lock was held by two runs at once — counting every run, also one
    // the node's loss may have caused to run again.
    let runs = std::fs::read_to_string(&log).unwrap();
    let runs: Vec<(
        usize,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = runs
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let at = |s: &str| chrono::DateTime::from_timestamp_nanos(s.parse().unwrap());
            (f[0][1..].parse().unwrap(), at(f[2]), at(f[3]))
        })
        .collect();
    for i in 0..40 {
        assert!(runs.iter().any(|r| r.0 == i), "t{i} never ran");
        assert_eq!(task(&view, &format!("t{i}")).status, TaskStatus::Completed);
    }
    for r in 0..4 {
        let intervals: Vec<_> = runs
            .iter()
            .filter(|run| run.0 % 4 == r)
            .map(|run| (run.1, run.2))
            .collect();
        assert_eq!(
            max_overlap(&intervals),
            1,
            "resource r{r} held twice at once"
        );
    }
    // No attempt ran twice: a dispatch whose acknowledgement the failover lost comes back to
    // the worker that ran it, which acknowledges it again; a report whose store was lost is
    // sent again. (A task may still run at a later attempt if it was taken back.)
    let log_text = std::fs::read_to_string(&log).unwrap();
    let mut attempts: Vec<(&str, &str)> = log_text
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            (f.next().unwrap_or(""), f.next().unwrap_or(""))
        })
        .collect();
    let all = attempts.len();
    attempts.sort();
    attempts.dedup();
    assert_eq!(attempts.len(), all, "an attempt ran twice:\n{log_text}");
    let again: Vec<String> = (0..40)
        .filter(|i| runs.iter().filter(|r| r.0 == *i).count() > 1)
        .map(|i| {
            let attempts: Vec<String> = std::fs::read_to_string(&log)
                .unwrap()
                .lines()
                .filter(|l| l.split(' ').next() == Some(format!("t{i}").as_str()))
                .map(|l| l.split(' ').nth(1).unwrap_or("?").to_string())
                .collect();
            format!("t{i} at attempts {}", attempts.join(","))
        })
        .collect();
    eprintln!(
        "cluster test: killed {leader}; {} runs for 40 tasks; run again: {again:?}",
        runs.len()
    );
    c.stop().await;
    drop(nodes);
}
