//! What `omoi bench` measures beside omoi: the raw pipelined fleet floor (worker processes
//! pulling no-op messages from a JetStream work queue, publishing a result and acking, fed by a
//! producer keeping as many in flight as omoi has slots), and the CPU time and memory meters
//! (from /proc) that make figures comparable on a noisy machine.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use clap::Args;
use futures::StreamExt;

use crate::bus::Names;

/// `omoi bench-floor-worker` (hidden): one process of the raw fleet.
#[derive(Debug, Args)]
pub struct FloorWorkerArgs {
    /// Messages handled at once.
    #[arg(long, default_value_t = 16)]
    pub capacity: usize,
}

fn queue_stream(names: &Names) -> String {
    format!("{}_fleetfloor_tasks", names.namespace())
}
fn result_stream(names: &Names) -> String {
    format!("{}_fleetfloor_results", names.namespace())
}
fn task_subject(names: &Names) -> String {
    format!("{}.fleetfloor.task", names.namespace())
}
fn result_subject(names: &Names) -> String {
    format!("{}.fleetfloor.result", names.namespace())
}
const WORKERS_CONSUMER: &str = "fleet";

/// The raw worker: pull, publish a result (awaiting its ack), ack — `capacity` at a time.
pub async fn run_worker(
    settings: &crate::config::Settings,
    args: FloorWorkerArgs,
) -> anyhow::Result<()> {
    let names = Names::new(&settings.namespace).map_err(anyhow::Error::msg)?;
    let nats = crate::bus::connect(
        crate::bus::NatsAccess::from_settings(settings),
        "omoi-floor",
    )
    .await?;
    let js = jetstream::new(nats);
    let consumer: consumer::PullConsumer = js
        .get_consumer_from_stream(WORKERS_CONSUMER, queue_stream(&names))
        .await
        .context("bind the fleet floor consumer")?;
    let slots = Arc::new(tokio::sync::Semaphore::new(args.capacity.max(1)));
    let mut messages = consumer.messages().await?;
    let result = result_subject(&names);
    while let Some(msg) = messages.next().await {
        let Ok(msg) = msg else { continue };
        let permit = slots.clone().acquire_owned().await?;
        let (js, result) = (js.clone(), result.clone());
        tokio::spawn(async move {
            if let Ok(ack) = js.publish(result, msg.payload.clone()).await {
                let _ = ack.await;
            }
            let _ = msg.ack().await;
            drop(permit);
        });
    }
    Ok(())
}

/// Runs the fleet floor: `workers` processes of `capacity` slots each, `messages` no-op
/// messages with `workers × capacity` in flight. Returns messages per second and the CPU time
/// it took.
pub async fn fleet_floor(
    settings: &crate::config::Settings,
    js: &jetstream::Context,
    names: &Names,
    workers: usize,
    capacity: usize,
    messages: usize,
) -> anyhow::Result<(f64, CpuTime)> {
    for (name, subject) in [
        (queue_stream(names), task_subject(names)),
        (result_stream(names), result_subject(names)),
    ] {
        js.create_stream(stream::Config {
            name,
            subjects: vec![subject],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    }
    let slots = (workers * capacity).max(1);
    js.get_stream(queue_stream(names))
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(WORKERS_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: slots as i64,
            ..Default::default()
        })
        .await?;
    // Results are stored (the workers await JetStream's ack); the producer hears each one.
    let mut stream = js.client().subscribe(result_subject(names)).await?;
    let exe = std::env::current_exe().context("own executable")?;
    let mut children = Vec::new();
    for _ in 0..workers {
        children.push(
            tokio::process::Command::new(&exe)
                .args(["bench-floor-worker", "--capacity", &capacity.to_string()])
                .env("OMOI_NAMESPACE", &settings.namespace)
                .env("OMOI_NATS_URL", &settings.nats_url)
                .env("OMOI_LOG_LEVEL", "error")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start a floor worker")?,
        );
    }
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    // The workers bind as they start; the first results say they are there.
    let meter = CpuMeter::start(&pids);
    let started = Instant::now();
    let subject = task_subject(names);
    let mut published = 0usize;
    let mut acks = Vec::with_capacity(slots);
    while published < slots.min(messages) {
        acks.push(
            js.publish(subject.clone(), published.to_string().into())
                .await?,
        );
        published += 1;
    }
    for ack in acks {
        ack.await?;
    }
    let mut done = 0usize;
    while done < messages {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("fleet floor: no result within 30 s")?;
        match next {
            Some(_) => done += 1,
            None => bail!("fleet floor results ended"),
        }
        if published < messages {
            // Keep the fleet full: one more for each one done (acked asynchronously).
            let ack = js
                .publish(subject.clone(), published.to_string().into())
                .await?;
            tokio::spawn(async move {
                let _ = ack.await;
            });
            published += 1;
        }
    }
    let elapsed = started.elapsed();
    let cpu = meter.stop(&pids);
    for mut c in children {
        let _ = c.kill().await;
    }
    for name in [queue_stream(names), result_stream(names)] {
        let _ = js.delete_stream(name).await;
    }
    Ok((messages as f64 / elapsed.as_secs_f64().max(1e-9), cpu))
}

/// CPU seconds used, split by who used them.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    /// This process: the control plane (and the bench's own client work).
    pub control_plane: f64,
    pub workers: f64,
    pub nats: f64,
    pub postgres: f64,
}

impl CpuTime {
    pub fn total(&self) -> f64 {
        self.control_plane + self.workers + self.nats + self.postgres
    }

    /// `"2.41 CPU s per 1,000 (cp 0.9, workers 0.8, nats 0.4, pg 0.3)"` for `n` items.
    pub fn per_thousand(&self, n: usize) -> String {
        let k = (n as f64 / 1000.0).max(1e-9);
        format!(
            "{:.2} CPU s per 1,000 (control plane {:.2}, workers {:.2}, nats-server {:.2}, PostgreSQL {:.2})",
            self.total() / k,
            self.control_plane / k,
            self.workers / k,
            self.nats / k,
            self.postgres / k
        )
    }
}

/// Clock ticks a second (`getconf CLK_TCK`; 100 on Linux unless told otherwise).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `(command, utime + stime, cutime + cstime)` of a process, in ticks.
fn stat(pid: u32) -> Option<(String, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command sits in parentheses and may hold spaces: fields follow the last `)`.
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After `)`: state is field 3 of the file, so utime (14) is index 11 here.
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((comm, num(11) + num(12), num(13) + num(14)))
}

/// Ticks used so far by each process measured: `pid → (group, own, exited children's)` — this
/// process (the control plane), the given worker pids, every nats-server and PostgreSQL
/// process of the machine.
fn snapshot(workers: &[u32]) -> HashMap<u32, (&'static str, u64, u64)> {
    let mut out = HashMap::new();
    let own = std::process::id();
    for (pid, group) in
        std::iter::once((own, "control_plane")).chain(workers.iter().map(|p| (*p, "workers")))
    {
        if let Some((_, used, children)) = stat(pid) {
            out.insert(pid, (group, used, children));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if out.contains_key(&pid) {
                continue;
            }
            let Some((comm, used, children)) = stat(pid) else {
                continue;
            };
            if comm.starts_with("nats-server") {
                out.insert(pid, ("nats", used, children));
            } else if comm.starts_with("postgres") {
                out.insert(pid, ("postgres", used, children));
            }
        }
    }
    out
}

/// Measures CPU time between `start` and `stop`, process by process: a process that started
/// meanwhile counts whole, one that exited counts nothing more (a PostgreSQL backend's time is
/// then in the postmaster's children time; another nats-server stopping does not cancel out
/// the one measured).
pub struct CpuMeter {
    at: HashMap<u32, (&'static str, u64, u64)>,
}

impl CpuMeter {
    pub fn start(workers: &[u32]) -> Self {
        Self {
            at: snapshot(workers),
        }
    }

    pub fn stop(self, workers: &[u32]) -> CpuTime {
        let tps = ticks_per_second();
        let mut used: HashMap<&'static str, u64> = HashMap::new();
        for (pid, (group, own, children)) in snapshot(workers) {
            let (own_before, children_before) = match self.at.get(&pid) {
                Some((g, o, c)) if *g == group => (*o, *c),
                _ => (0, 0),
            };
            let mut ticks = own.saturating_sub(own_before);
            if group == "postgres" {
                // The postmaster's children time counts the backends that exited.
                ticks += children.saturating_sub(children_before);
            }
            *used.entry(group).or_default() += ticks;
        }
        let seconds = |k: &str| used.get(k).copied().unwrap_or(0) as f64 / tps;
        CpuTime {
            control_plane: seconds("control_plane"),
            workers: seconds("workers"),
            nats: seconds("nats"),
            postgres: seconds("postgres"),
        }
    }
}

/// This process's resident memory, in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
