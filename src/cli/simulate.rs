//! `omoi simulate NAME|FILE`: a pattern end to end on the real NATS and PostgreSQL, in a scratch
//! namespace and database, with a fleet of simulated agents; prints the run's report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::config::Settings;
use crate::runtime::Shutdown;
use crate::sim::latency::Latency;
use crate::sim::{Fleet, recorded, report, required_capabilities, simulated_spec};
use crate::worker::AgentSpec;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A built-in pattern's name, a name found in `patterns_dir`, or a file.
    pub pattern: String,
    /// A parameter, `name=value`; repeatable.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Simulated agents.
    #[arg(long, default_value_t = 4)]
    pub agents: usize,
    /// Tasks each agent runs at once.
    #[arg(long, default_value_t = 1)]
    pub capacity: i32,
    /// Capabilities of every agent (default: every capability the pattern names).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// Chance that an attempt fails (retried per the step's max_attempts).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Task run time: `fixed:MS`, `uniform:MIN..MAX`, `exp:MEAN` or `normal:MEAN,SD`.
    #[arg(long, default_value = "uniform:20..200")]
    pub latency: Latency,
    /// Seed of the latency and failure draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write an SVG Gantt chart here.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Width of the text timeline.
    #[arg(long, default_value_t = 100)]
    pub width: usize,
    /// Longest run, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

pub async fn run(settings: Settings, args: SimulateArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        bail!(
            "--fail-rate must be between 0 and 1, got {}",
            args.fail_rate
        );
    }
    if args.agents == 0 || args.capacity < 1 {
        bail!("--agents and --capacity must be at least 1");
    }
    let pattern = super::patterns::find(&settings, &args.pattern)?;
    let params = pattern.parse_assignments(args.params.iter().map(String::as_str))?;
    let instantiated = pattern.instantiate(&params)?;
    let mut capabilities = args.capabilities.clone();
    if capabilities.is_empty() {
        capabilities = required_capabilities(&instantiated.spec)
            .into_iter()
            .collect();
    }
    let fleet = Fleet {
        agents: args.agents,
        capacity: args.capacity,
        capabilities,
        latency: args.latency,
        fail_rate: args.fail_rate,
        seed: args.seed,
    };
    let spec = simulated_spec(&instantiated.spec, &instantiated.hints, &fleet);
    let scratch = super::scratch::Scratch::create(&settings, "sim").await?;
    eprintln!(
        "simulating {} with {} agent(s) × capacity {} [{}], latency {}, fail rate {}, seed {} (namespace {})",
        pattern.name(),
        fleet.agents,
        fleet.capacity,
        fleet.capabilities.join(","),
        fleet.latency,
        fleet.fail_rate,
        fleet.seed,
        scratch.names.namespace()
    );
    let result = simulate(&scratch, pattern.name(), spec, &fleet, &args).await;
    scratch.remove().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text(args.width));
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report.svg()).with_context(|| format!("write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn simulate(
    scratch: &super::scratch::Scratch,
    pattern: &str,
    spec: crate::domain::dag::WorkflowSpec,
    fleet: &Fleet,
    args: &SimulateArgs,
) -> anyhow::Result<report::Report> {
    let settings = &scratch.settings;
    let shutdown = Shutdown::new();
    crate::coordinator::start(settings, &shutdown).await?;
    let agents: Vec<AgentSpec> = (1..=fleet.agents)
        .map(|i| AgentSpec {
            name: format!("sim-agent-{i}"),
            capabilities: fleet.capabilities.clone(),
            capacity: fleet.capacity,
            agent_type: "simulated".into(),
            tags: vec!["simulation".into()],
        })
        .collect();
    let worker_shutdown = Shutdown::new();
    let worker = tokio::spawn({
        let settings = settings.clone();
        let shutdown = worker_shutdown.clone();
        async move { crate::worker::run(&settings, agents, shutdown).await }
    });
    let result = async {
        let pool = crate::db::connect(&settings.database_url, 2).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM agents WHERE status IN ('idle', 'running')",
            )
            .fetch_one(&pool)
            .await?;
            if live as usize >= fleet.agents {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("simulated agents did not register within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client =
            crate::client::WorkflowClient::new(scratch.nats.clone(), scratch.names.clone());
        let submitted = client.submit(&spec).await?;
        if let Some(u) = submitted.unschedulable.first() {
            bail!(
                "task `{}` needs what no simulated agent has: {} (pass --capabilities)",
                u.key,
                u.missing()
            );
        }
        let view = super::patterns::follow(
            &client,
            submitted.workflow_id,
            Duration::from_secs(args.timeout),
        )
        .await?;
        eprint!("{}", super::patterns::summary(&view));
        let bus = crate::bus::EventBus::new(scratch.js.clone(), scratch.names.clone());
        let failed_busy = crate::sim::failed_attempt_busy(&crate::sim::task_events(&bus).await?);
        let run = recorded(&pool, submitted.workflow_id, &failed_busy).await?;
        pool.close().await;
        Ok(report::build(
            pattern,
            run.started,
            run.finished,
            &run.tasks,
            &run.agents,
        ))
    }
    .await;
    worker_shutdown.token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
    shutdown.drain(Duration::from_secs(5)).await;
    result
}
