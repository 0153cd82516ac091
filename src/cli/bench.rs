//! `omoi bench`: measures omoi against the raw NATS floor on the running NATS and PostgreSQL,
//! in one run, in a scratch namespace and database that are removed afterwards.
//!
//! 1. floors: a JetStream publish → pull → ack → reply round trip, and a raw pipelined fleet
//!    (N worker processes pulling no-op messages, publishing a result, acking; as many in
//!    flight as omoi has slots), no omoi code;
//! 2. throughput: no-op (`echo`) tasks of a wide DAG, run by N `omoi worker` processes, as a
//!    ratio to the fleet floor, with the CPU seconds per 1,000 tasks of every process involved;
//! 3. the backlog curve: wide DAGs of several sizes, and control-plane memory per pending task
//!    at the largest;
//! 4. hop latency: a chain, from a dependency's completion to its dependant's start;
//! 5. a dynamic split;
//! 6. the scheduler alone (control plane stopped): fetch-and-assign of 10,000 ready tasks over
//!    100 agents, and the memory it holds per pending task (100,000 of them);
//! 7. lock acquire + release vs a raw KV create.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use clap::Args;
use futures::StreamExt;

use crate::bus::kv_lock::{Acquire, LockManager};
use crate::bus::{Names, provision};
use crate::config::Settings;
use crate::domain::WorkflowStatus;
use crate::domain::dag::{TaskSpec, WorkflowSpec};
use crate::protocol::locks::LockMode;
use crate::runtime::Shutdown;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks in the wide DAG.
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Tasks in the chain.
    #[arg(long, default_value_t = 1_000)]
    pub chain: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Capacity of each worker's agent.
    #[arg(long, default_value_t = 16)]
    pub capacity: i32,
    /// Items of the dynamic split (a coordination node fanning out at run time).
    #[arg(long, default_value_t = 5_000)]
    pub split: usize,
    /// Round trips for the floor and lock measurements.
    #[arg(long, default_value_t = 2_000)]
    pub samples: usize,
    /// Sizes of the wide DAGs of the backlog curve (comma-separated; `0`: none).
    #[arg(long, value_delimiter = ',', default_value = "2000,20000,100000")]
    pub backlog: Vec<usize>,
}

struct Stats {
    median: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len().max(1);
    let total: Duration = v.iter().sum();
    Stats {
        median: v.get(n / 2).copied().unwrap_or_default(),
        p99: v
            .get((n * 99 / 100).min(n - 1))
            .copied()
            .unwrap_or_default(),
        mean: total / n as u32,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    let scratch = super::scratch::Scratch::create(&settings, "bench").await?;
    let ns = scratch.names.namespace().to_string();
    println!(
        "omoi bench — namespace {ns}, {} worker process(es)",
        args.workers
    );

    let result = measure(
        &scratch.settings,
        &args,
        &scratch.nats,
        &scratch.js,
        &scratch.names,
    )
    .await;

    // Clean up whatever happened.
    let _ = scratch.js.delete_stream(format!("{ns}_floor")).await;
    scratch.remove().await;
    result
}

async fn measure(
    settings: &Settings,
    args: &BenchArgs,
    nats: &async_nats::Client,
    js: &jetstream::Context,
    names: &Names,
) -> anyhow::Result<()> {
    // 1. The floor.
    let floor = floor_round_trip(nats, js, names, args.samples).await?;
    println!(
        "floor   jetstream publish→pull→ack→reply   median {}  p99 {}  ({} samples)",
        ms(floor.median),
        ms(floor.p99),
        args.samples
    );

    // The raw fleet: the same processes and slots as omoi will have, no omoi code.
    let (fleet, fleet_cpu) = super::bench_floor::fleet_floor(
        settings,
        js,
        names,
        args.workers,
        args.capacity.max(1) as usize,
        args.tasks,
    )
    .await?;
    println!(
        "floor   raw pipelined fleet ({} processes × {} slots, {} no-op messages)   {:.0} messages/s  {}",
        args.workers,
        args.capacity,
        args.tasks,
        fleet,
        fleet_cpu.per_thousand(args.tasks)
    );

    // Control plane in this process, workers as processes.
    let shutdown = Shutdown::new();
    crate::coordinator::start(settings, &shutdown).await?;
    let exe = std::env::current_exe().context("own executable")?;
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let child = tokio::process::Command::new(&exe)
            .args([
                "worker",
                "--agent",
                &format!("bench-{i}"),
                "--capabilities",
                "echo",
            ])
            .args(["--capacity", &args.capacity.to_string()])
            .env("OMOI_NAMESPACE", &settings.namespace)
            .env("OMOI_NATS_URL", &settings.nats_url)
            .env("OMOI_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start a worker process")?;
        workers.push(child);
    }
    let pool = crate::db::connect(&settings.database_url, 2).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE status = 'idle'")
            .fetch_one(&pool)
            .await?;
        if live as usize >= args.workers {
            break;
        }
        if Instant::now() > deadline {
            bail!("workers did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = crate::client::WorkflowClient::new(nats.clone(), names.clone());
    // Submissions go straight to the workflow service: a 20,000-task submission is larger than
    // a NATS message (HTTP takes it too); the leader wakes on its `workflow.created` event.
    let bus = crate::bus::EventBus::new(js.clone(), names.clone());
    let outbox = crate::service::outbox::Outbox::start(js.clone(), pool.clone(), &shutdown);
    let workflows = crate::service::workflows::Workflows::new(
        pool.clone(),
        bus,
        outbox,
        std::sync::Arc::new(tokio::sync::Notify::new()),
    );
    let echo = |key: String, deps: Vec<String>| TaskSpec {
        capabilities: vec!["echo".into()],
        depends_on: deps,
        ..TaskSpec::new(key)
    };

    // 2. Throughput of a wide DAG.
    let wide = WorkflowSpec {
        v: None,
        name: "bench-wide".into(),
        failure_policy: Default::default(),
        tasks: (0..args.tasks)
            .map(|i| echo(format!("t{i}"), vec![]))
            .collect(),
    };
    let worker_pids: Vec<u32> = workers.iter().filter_map(|w| w.id()).collect();
    let run = run_wide(&workflows, &client, wide, &worker_pids).await?;
    let per_task = run.elapsed / args.tasks.max(1) as u32;
    println!(
        "omoi    {}-task wide DAG, no-op tasks        {:.0} tasks/s  ({:.2} s total, submit {})  → {:.2} × the fleet floor",
        args.tasks,
        run.tasks_per_second,
        run.elapsed.as_secs_f64(),
        ms(run.submit),
        run.tasks_per_second / fleet.max(1e-9)
    );
    println!(
        "        per task {} vs floor {}  → ratio {:.2}; {}",
        ms(per_task),
        ms(floor.median),
        per_task.as_secs_f64() / floor.median.as_secs_f64().max(1e-9),
        run.cpu.per_thousand(args.tasks)
    );

    // The backlog curve: does a task cost more when more are waiting?
    let largest = args.backlog.iter().copied().max().unwrap_or(0);
    let mut curve = Vec::new();
    for &size in args.backlog.iter().filter(|s| **s > 0) {
        let spec = WorkflowSpec {
            v: None,
            name: format!("bench-backlog-{size}"),
            failure_policy: Default::default(),
            tasks: (0..size).map(|i| echo(format!("b{i}"), vec![])).collect(),
        };
        let run = run_wide(&workflows, &client, spec, &worker_pids).await?;
        let memory = if size == largest && size > 0 {
            format!(
                "; control plane +{:.0} bytes per pending task",
                run.peak_rss_growth as f64 / size as f64
            )
        } else {
            String::new()
        };
        println!(
            "omoi    backlog {size:>7} tasks   {:.0} tasks/s  (submit {})  {}{memory}",
            run.tasks_per_second,
            ms(run.submit),
            run.cpu.per_thousand(size)
        );
        curve.push((size, run.tasks_per_second));
    }
    if let (Some(small), Some(large)) = (curve.first(), curve.last()) {
        if curve.len() > 1 {
            println!(
                "        tasks/s at {} / at {}  → ratio {:.2}",
                large.0,
                small.0,
                large.1 / small.1.max(1e-9)
            );
        }
    }

    // 3. Hop latency along a chain.
    let chain = WorkflowSpec {
        v: None,
        name: "bench-chain".into(),
        failure_policy: Default::default(),
        tasks: (0..args.chain)
            .map(|i| {
                let deps = if i == 0 {
                    vec![]
                } else {
                    vec![format!("c{}", i - 1)]
                };
                echo(format!("c{i}"), deps)
            })
            .collect(),
    };
    let started = Instant::now();
    let submitted = workflows.submit(chain).await?;
    let view = wait_showing_progress(&client, submitted.workflow_id, "chain").await?;
    let chain_time = started.elapsed();
    if view.workflow.status != WorkflowStatus::Completed {
        bail!("chain ended {}", view.workflow.status);
    }
    let hops: Vec<Duration> = sqlx::query_scalar::<_, f64>(
        "SELECT EXTRACT(EPOCH FROM (t.started_at - d.finished_at))::float8
         FROM tasks t JOIN tasks d ON d.workflow_id = t.workflow_id AND d.key = t.depends_on[1]
         WHERE t.workflow_id = $1",
    )
    .bind(submitted.workflow_id)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .map(|s| Duration::from_secs_f64(s.max(0.0)))
    .collect();
    let hop = stats(hops);
    println!(
        "omoi    {}-task chain: dependency done → dependant started   median {}  p99 {}  mean {}",
        args.chain,
        ms(hop.median),
        ms(hop.p99),
        ms(hop.mean)
    );
    println!(
        "        whole chain {:.2} s = {} per task end to end  → ratio to floor {:.2}",
        chain_time.as_secs_f64(),
        ms(chain_time / args.chain.max(1) as u32),
        (chain_time / args.chain.max(1) as u32).as_secs_f64()
            / floor.median.as_secs_f64().max(1e-9)
    );

    // 4. A dynamic split: a task's output list fanned out by the coordinator, then joined.
    let items: Vec<serde_json::Value> = (0..args.split).map(|i| serde_json::json!(i)).collect();
    let split: WorkflowSpec = serde_json::from_value(serde_json::json!({
        "name": "bench-split",
        "tasks": [
            {"key": "plan", "executor": "sleep", "capabilities": ["echo"],
             "input": {"output": {"items": items}}},
            {"key": "fan", "depends_on": ["plan"], "split": {
                "items": "${deps.plan.output.items}",
                "task": {"capabilities": ["echo"], "input": {"n": "${item}"}}}},
            {"key": "after", "depends_on": ["fan"], "capabilities": ["echo"],
             "input": {"count": "${deps.fan.output.count}"}}
        ]
    }))?;
    let started = Instant::now();
    let submitted = workflows.submit(split).await?;
    let view = wait_showing_progress(&client, submitted.workflow_id, "split").await?;
    let split_time = started.elapsed();
    if view.workflow.status != WorkflowStatus::Completed {
        bail!("split workflow ended {}", view.workflow.status);
    }
    // Expansion: from the source's completion to the last child inserted.
    let (expand_ms, gather_ms): (f64, f64) = sqlx::query_as(
        "SELECT (EXTRACT(EPOCH FROM (max(c.created_at) - p.finished_at)) * 1000)::float8,
                (EXTRACT(EPOCH FROM (f.finished_at - max(c.finished_at))) * 1000)::float8
         FROM tasks p, tasks f, tasks c
         WHERE p.workflow_id = $1 AND p.key = 'plan' AND f.workflow_id = $1 AND f.key = 'fan'
           AND c.workflow_id = $1 AND c.key LIKE 'fan/%'
         GROUP BY p.finished_at, f.finished_at",
    )
    .bind(submitted.workflow_id)
    .fetch_one(&pool)
    .await?;
    println!(
        "omoi    {}-item dynamic split → join             {:.0} tasks/s  ({:.2} s total; expansion {expand_ms:.0} ms, join after last child {gather_ms:.1} ms)",
        args.split,
        args.split as f64 / split_time.as_secs_f64(),
        split_time.as_secs_f64(),
    );

    for mut w in workers {
        if let Some(pid) = w.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), w.wait()).await;
    }
    shutdown.drain(Duration::from_secs(5)).await;

    // 5. The scheduler's own cost, with the control plane stopped: fetch-and-assign, and the
    // memory of pending tasks.
    let assign = fetch_and_assign(
        &pool,
        &settings.database_url,
        settings.agent_stale_after_ms as i64,
    )
    .await?;
    println!(
        "omoi    fetch-and-assign of {ASSIGN_TASKS} ready tasks over {ASSIGN_AGENTS} agents   p95 {}  median {}  ({ASSIGN_ROUNDS} rounds; of which planning in memory: median {})",
        ms(assign.round.p95),
        ms(assign.round.median),
        ms(assign.plan.median),
    );
    println!(
        "omoi    scheduler memory of {} pending tasks   {:.0} bytes per task  (built from the database in {})",
        assign.pending,
        assign.bytes_per_pending,
        ms(assign.load)
    );
    pool.close().await;

    // 6. Locks vs raw KV.
    let kv = provision::open_bucket(js, names, crate::bus::names::BUCKET_LOCKS).await?;
    let mut raw = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let t = Instant::now();
        kv.create(format!("raw.{i}"), "x".into()).await?;
        raw.push(t.elapsed());
    }
    let manager = LockManager::new(kv, Duration::from_secs(15));
    let mut acquire = Vec::with_capacity(args.samples);
    let mut cycle = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let name = format!("bench:{}", i % 64);
        let owner = format!("o{i}");
        let t = Instant::now();
        let got = manager
            .try_acquire(&name, LockMode::Exclusive, &owner, None)
            .await?;
        acquire.push(t.elapsed());
        let Acquire::Acquired { .. } = got else {
            bail!("lock {name} unexpectedly busy");
        };
        manager.withdraw(&name, &owner).await?;
        cycle.push(t.elapsed());
    }
    let (raw, acquire, cycle) = (stats(raw), stats(acquire), stats(cycle));
    println!(
        "floor   raw KV create                      median {}  p99 {}",
        ms(raw.median),
        ms(raw.p99)
    );
    println!(
        "omoi    lock acquire (existing key)         median {}  p99 {}  → ratio {:.2}",
        ms(acquire.median),
        ms(acquire.p99),
        acquire.median.as_secs_f64() / raw.median.as_secs_f64().max(1e-9)
    );
    println!(
        "omoi    lock acquire + release             median {}  p99 {}",
        ms(cycle.median),
        ms(cycle.p99)
    );
    Ok(())
}

const ASSIGN_TASKS: usize = 10_000;
const ASSIGN_AGENTS: usize = 100;
const ASSIGN_ROUNDS: usize = 20;
/// Pending tasks whose scheduler memory is measured.
const MEMORY_TASKS: usize = 100_000;

/// What the scheduler's own measurements found.
struct AssignRun {
    round: Percentiles,
    plan: Percentiles,
    load: Duration,
    pending: usize,
    bytes_per_pending: f64,
}

struct Percentiles {
    median: Duration,
    p95: Duration,
}

impl Percentiles {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort();
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))];
        Self {
            median: at(0.5),
            p95: at(0.95),
        }
    }
}

/// Ready tasks of one workflow, written straight to the database (no events: nothing listens).
async fn ready_tasks(
    pool: &sqlx::PgPool,
    name: &str,
    n: usize,
) -> anyhow::Result<crate::domain::WorkflowId> {
    let id = crate::domain::WorkflowId::new();
    let spec = TaskSpec {
        capabilities: vec!["assign-bench".into()],
        ..TaskSpec::new(String::new())
    };
    let rows: Vec<crate::db::workflows::NewTask> = (0..n)
        .map(|i| {
            let mut row =
                crate::db::workflows::NewTask::from_spec(crate::domain::TaskId::new(), &spec);
            row.key = format!("t{i}");
            row
        })
        .collect();
    let mut tx = pool.begin().await?;
    crate::db::workflows::create(
        &mut tx,
        id,
        name,
        "fail_fast",
        &serde_json::json!({}),
        &rows,
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// 10,000 ready tasks over 100 agents of capacity 100, no worker behind them: each round plans
/// every task onto an agent from the scheduler's memory and assigns them in one statement, then
/// the tasks are put back to ready and the table vacuumed (not timed). Then the memory of
/// 100,000 pending tasks.
async fn fetch_and_assign(
    pool: &sqlx::PgPool,
    database_url: &str,
    stale_after_ms: i64,
) -> anyhow::Result<AssignRun> {
    use crate::service::scheduler::state::State;
    for i in 0..ASSIGN_AGENTS {
        crate::db::agents::insert(
            pool,
            &crate::db::agents::NewAgent {
                id: crate::domain::AgentId::new(),
                name: format!("assign-bench-{i}"),
                agent_type: "bench".into(),
                phase_id: None,
                capabilities: vec!["assign-bench".into()],
                capacity: (ASSIGN_TASKS / ASSIGN_AGENTS) as i32,
                tags: vec![],
                metadata: serde_json::json!({}),
                executors: vec!["echo".into()],
                instance: None,
            },
        )
        .await?;
    }
    let workflow = ready_tasks(pool, "bench-assign", ASSIGN_TASKS).await?;
    let mut rounds = Vec::with_capacity(ASSIGN_ROUNDS);
    let mut plans = Vec::with_capacity(ASSIGN_ROUNDS);
    let mut conn = pool.acquire().await?;
    // The assignments run on a connection readied as the scheduler's steps' is.
    let mut hot = pool.acquire().await?;
    crate::db::scheduling::make_hot(&mut hot).await?;
    for _ in 0..ASSIGN_ROUNDS {
        let mut state = State::load(&mut conn).await?;
        state.set_agents(crate::db::agents::dispatchable(&mut *conn).await?);
        let started = Instant::now();
        let planned = state.plan(ASSIGN_TASKS, stale_after_ms);
        plans.push(started.elapsed());
        let mut tx = sqlx::Connection::begin(&mut *hot).await?;
        let assigned =
            crate::db::scheduling::assign(&mut tx, &planned, &Default::default()).await?;
        tx.commit().await?;
        rounds.push(started.elapsed());
        if assigned.len() != ASSIGN_TASKS {
            bail!(
                "fetch-and-assign assigned {} of {ASSIGN_TASKS} tasks",
                assigned.len()
            );
        }
        sqlx::query(
            "UPDATE tasks SET status = 'ready', agent_id = NULL, ready_at = now() WHERE workflow_id = $1",
        )
        .bind(workflow)
        .execute(&mut *conn)
        .await?;
        // Each round starts from the same table, not from the dead rows of twenty resets in a
        // few seconds (more than autovacuum sees in steady work).
        sqlx::query("VACUUM tasks").execute(&mut *conn).await?;
    }
    drop(hot.detach());
    // Memory: what the leader holds for each pending (ready) task, measured in a fresh process
    // (this one's heap has room left by what came before).
    ready_tasks(pool, "bench-memory", MEMORY_TASKS - ASSIGN_TASKS).await?;
    sqlx::query("DELETE FROM agents WHERE agent_type = 'bench'")
        .execute(&mut *conn)
        .await?;
    let exe = std::env::current_exe().context("own executable")?;
    let probe = tokio::process::Command::new(&exe)
        .arg("bench-scheduler-memory")
        .env("OMOI_DATABASE_URL", database_url)
        .env("OMOI_LOG_LEVEL", "error")
        .output()
        .await
        .context("run the memory probe")?;
    let report: serde_json::Value = serde_json::from_slice(&probe.stdout).with_context(|| {
        format!(
            "memory probe said: {}",
            String::from_utf8_lossy(&probe.stderr)
        )
    })?;
    let pending = report["pending"].as_u64().unwrap_or(0) as usize;
    let bytes = report["bytes"].as_u64().unwrap_or(0);
    let load = Duration::from_secs_f64(report["load_seconds"].as_f64().unwrap_or(0.0));
    Ok(AssignRun {
        round: Percentiles::of(rounds),
        plan: Percentiles::of(plans),
        load,
        pending,
        bytes_per_pending: bytes as f64 / pending.max(1) as f64,
    })
}

/// `omoi bench-scheduler-memory` (hidden): builds the scheduler's memory from the database
/// and prints `{pending, bytes, load_seconds}` — resident memory grown, peak included.
pub async fn scheduler_memory(settings: &Settings) -> anyhow::Result<()> {
    let pool = crate::db::connect(&settings.database_url, 1).await?;
    let mut conn = pool.acquire().await?;
    let before = super::bench_floor::rss_bytes();
    let started = Instant::now();
    let state = crate::service::scheduler::state::State::load(&mut conn).await?;
    let load = started.elapsed();
    let after = super::bench_floor::rss_bytes();
    println!(
        "{}",
        serde_json::json!({
            "pending": state.counts().0,
            "bytes": after.saturating_sub(before),
            "load_seconds": load.as_secs_f64(),
        })
    );
    Ok(())
}

/// What one wide DAG run measured.
struct WideRun {
    elapsed: Duration,
    submit: Duration,
    tasks_per_second: f64,
    cpu: super::bench_floor::CpuTime,
    /// Highest resident memory of this process while the tasks were pending, less what it was
    /// before the submission.
    peak_rss_growth: u64,
}

/// Waits (at most an hour) for a workflow of the bench, telling on stderr how far it is (stdout
/// is the report): when submitted, at the first look and every few seconds, and when it ends.
async fn wait_showing_progress(
    client: &crate::client::WorkflowClient,
    id: crate::domain::WorkflowId,
    label: &str,
) -> anyhow::Result<crate::protocol::workflows::WorkflowView> {
    const EVERY: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let mut shown: Option<Instant> = None;
    let line = |view: &crate::protocol::workflows::WorkflowView| {
        let total: usize = view.counts.values().sum();
        let done = view.counts.get("completed").copied().unwrap_or(0);
        eprintln!(
            "bench: {label}: {done} of {total} completed after {:.1} s",
            started.elapsed().as_secs_f64()
        );
    };
    eprintln!("bench: {label}: submitted");
    let view = client
        .wait_with(id, Duration::from_secs(3_600), |view| {
            if shown.is_none_or(|at| at.elapsed() >= EVERY) {
                shown = Some(Instant::now());
                line(view);
            }
        })
        .await?;
    line(&view);
    Ok(view)
}

/// Submits a wide DAG and waits for it, measuring time, CPU and memory.
async fn run_wide(
    workflows: &crate::service::workflows::Workflows,
    client: &crate::client::WorkflowClient,
    spec: WorkflowSpec,
    worker_pids: &[u32],
) -> anyhow::Result<WideRun> {
    let size = spec.tasks.len();
    let before = super::bench_floor::rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(
                    super::bench_floor::rss_bytes(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let meter = super::bench_floor::CpuMeter::start(worker_pids);
    let started = Instant::now();
    let submitted = workflows.submit(spec).await?;
    let submit = started.elapsed();
    let view =
        wait_showing_progress(client, submitted.workflow_id, &format!("{size} tasks")).await?;
    let elapsed = started.elapsed();
    let cpu = meter.stop(worker_pids);
    sampler.abort();
    if view.workflow.status != WorkflowStatus::Completed {
        bail!("wide workflow of {size} ended {}", view.workflow.status);
    }
    Ok(WideRun {
        elapsed,
        submit,
        tasks_per_second: size as f64 / elapsed.as_secs_f64().max(1e-9),
        cpu,
        peak_rss_growth: peak
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(before),
    })
}

/// Publish (await the ack) → a responder pulls, acks and replies on a core subject.
async fn floor_round_trip(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    names: &Names,
    samples: usize,
) -> anyhow::Result<Stats> {
    let stream_name = format!("{}_floor", names.namespace());
    let subject = format!("{}.floor.task", names.namespace());
    let reply_subject = format!("{}.floor.reply", names.namespace());
    let stream = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("floor".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut replies = nats.subscribe(reply_subject.clone()).await?;
    let responder_nats = nats.clone();
    let responder = tokio::spawn(async move {
        let Ok(mut messages) = consumer.messages().await else {
            return;
        };
        while let Some(Ok(msg)) = messages.next().await {
            let _ = msg.ack().await;
            let _ = responder_nats
                .publish(reply_subject.clone(), msg.payload.clone())
                .await;
        }
    });
    let mut samples_out = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        js.publish(subject.clone(), i.to_string().into())
            .await?
            .await?;
        tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .context("floor reply")?;
        samples_out.push(t.elapsed());
    }
    responder.abort();
    Ok(stats(samples_out))
}
