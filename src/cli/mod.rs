//! The command line: one subcommand per file. Data goes to stdout, diagnostics to stderr.

mod bench;
mod bench_floor;
mod dev;
mod nats_auth;
mod patterns;
mod scratch;
mod simulate;
mod token;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Settings, Sources};
use crate::runtime::{Shutdown, telemetry};
use crate::worker::AgentSpec;

#[derive(Debug, Parser)]
#[command(
    name = "omoi",
    version,
    about = "Coordinate a fleet of AI agents over NATS JetStream"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags that override every other configuration source.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file (default: ./omoi.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Namespace prefixing every subject, stream and bucket.
    #[arg(long, global = true)]
    pub namespace: Option<String>,
    #[arg(long, global = true, value_name = "URL")]
    pub nats_url: Option<String>,
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// HTTP listen address of the control plane (host:port).
    #[arg(long, global = true, value_name = "ADDR")]
    pub http_addr: Option<String>,
    /// `human` or `json`.
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// A tracing filter, e.g. `info` or `omoi=debug`.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane: HTTP API, registry, scheduler (leader-elected).
    Coordinator,
    /// Run a stateless worker hosting one agent (flags) or several (--agents-file).
    Worker(WorkerArgs),
    /// Apply database migrations and create or update JetStream streams and buckets.
    Migrate(MigrateArgs),
    /// Print the effective configuration (secrets masked).
    Config,
    /// Run a control plane and N workers in one process, for development.
    Dev(dev::DevArgs),
    /// Submit a workflow from a JSON or YAML file (prints the workflow id and task ids).
    Submit(SubmitArgs),
    /// List resource locks and their holders, or force-release one.
    Locks(LocksArgs),
    /// Measure omoi against the raw NATS floor (scratch namespace and database).
    Bench(bench::BenchArgs),
    /// One process of `omoi bench`'s raw fleet floor (started by the bench).
    #[command(hide = true)]
    BenchFloorWorker(bench_floor::FloorWorkerArgs),
    /// Builds the scheduler's memory from the database in a fresh process and prints what it
    /// cost (started by the bench).
    #[command(hide = true)]
    BenchSchedulerMemory,
    /// Runs a `shell` task's program in a process group that dies with the worker (started by
    /// the worker; reads the payload line, then watches its stdin).
    #[command(hide = true)]
    ExecGuard {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        program: Vec<std::ffi::OsString>,
    },
    /// List, show and validate pattern files (patterns/README.md).
    #[command(subcommand)]
    Patterns(patterns::PatternsCommand),
    /// Run a pattern: submit it with its parameters and follow its progress.
    Run(patterns::RunArgs),
    /// Run a pattern with simulated agents (scratch namespace and database) and report on it.
    Simulate(simulate::SimulateArgs),
    /// Write least-privilege nats-server authorization (and NKEY seeds) for the namespace.
    NatsAuth(nats_auth::NatsAuthArgs),
    /// Create, list and revoke API tokens (in the database).
    #[command(subcommand)]
    Token(token::TokenCommand),
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The workflow file (`.json`, `.yaml` or `.yml`).
    pub file: PathBuf,
    /// Wait until the workflow finishes and print its final state.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Replicas of every stream and bucket (3 on a 3-node NATS cluster); default
    /// `nats_replicas`, and when that is 0, what each already has (1 for a new one).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub replicas: Option<u32>,
}

#[derive(Debug, Args)]
pub struct LocksArgs {
    /// Force-release this resource's lock (operator action).
    #[arg(long, value_name = "RESOURCE")]
    pub release: Option<String>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Agent name, unique among live agents (default: `worker-<hostname>`, so replicas of
    /// one container image get distinct names).
    #[arg(long)]
    pub agent: Option<String>,
    /// Comma-separated capabilities.
    #[arg(long, value_delimiter = ',', default_value = "echo")]
    pub capabilities: Vec<String>,
    /// Most tasks the agent runs at once.
    #[arg(long, default_value_t = 1)]
    pub capacity: i32,
    /// A TOML file with `[[agents]]` tables (name, capabilities, capacity, agent_type, tags).
    #[arg(long, value_name = "FILE", conflicts_with = "agent")]
    pub agents_file: Option<PathBuf>,
    /// Executors to offer, comma-separated (`worker_executors`; default echo,sleep,sim).
    /// `shell` runs commands from task input and `http` makes requests: name them only where
    /// everyone who can submit workflows may do that.
    #[arg(long, value_name = "LIST")]
    pub executors: Option<String>,
}

impl GlobalArgs {
    fn sources(&self) -> Sources {
        let mut sources = Sources::from_process_env();
        sources.file = self.config.clone();
        let flags = [
            ("namespace", &self.namespace),
            ("nats_url", &self.nats_url),
            ("database_url", &self.database_url),
            ("http_addr", &self.http_addr),
            ("log_format", &self.log_format),
            ("log_level", &self.log_level),
        ];
        sources.overrides = flags
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect();
        sources
    }
}

#[derive(serde::Deserialize)]
struct AgentsFile {
    agents: Vec<AgentSpec>,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        // No settings, no logging: the guard's stdout and stderr are the task's.
        Command::ExecGuard { program } => {
            std::process::exit(crate::worker::guard::run(program).await)
        }
        command => command,
    };
    let mut settings = Settings::load(&cli.global.sources())?;
    // Commands that host a control plane only to measure or report on it stay quiet unless a
    // log level was asked for: their output is the report.
    let reporting = matches!(command, Command::Simulate(_) | Command::Bench(_));
    if reporting && cli.global.log_level.is_none() && std::env::var_os("OMOI_LOG_LEVEL").is_none() {
        settings.log_level = "warn".into();
    }
    telemetry::init_tracing(settings.log_format, &settings.log_level);
    let _ = telemetry::prometheus();
    match command {
        Command::ExecGuard { .. } => Ok(()), // ran above
        Command::Config => {
            print!("{}", settings.render_toml());
            Ok(())
        }
        Command::Migrate(args) => {
            if let Some(replicas) = args.replicas {
                settings.nats_replicas = replicas;
            }
            if crate::db::ensure_database(&settings.database_url).await? {
                eprintln!(
                    "created database {}",
                    crate::config::mask_url_password(&settings.database_url)
                );
            }
            crate::coordinator::migrate(&settings).await?;
            let replicas = match settings.nats_replicas {
                0 => String::new(),
                n => format!(" ({n} replicas each)"),
            };
            eprintln!(
                "migrations applied; streams and buckets of namespace `{}` ready{replicas}",
                settings.namespace
            );
            Ok(())
        }
        Command::Coordinator => {
            let shutdown = Shutdown::new();
            shutdown.cancel_on_signals();
            crate::coordinator::run(&settings, shutdown).await?;
            Ok(())
        }
        Command::Worker(args) => {
            let agents = match &args.agents_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("read {}", path.display()))?;
                    let file: AgentsFile = config::Config::builder()
                        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
                        .build()
                        .and_then(|c| c.try_deserialize())
                        .with_context(|| format!("parse {}", path.display()))?;
                    file.agents
                }
                None => vec![AgentSpec {
                    name: args.agent.clone().unwrap_or_else(default_agent_name),
                    capabilities: args.capabilities.clone(),
                    capacity: args.capacity,
                    agent_type: "worker".into(),
                    tags: vec![],
                }],
            };
            if let Some(list) = &args.executors {
                settings.worker_executors = list.clone();
                settings.validate()?;
            }
            let shutdown = Shutdown::new();
            shutdown.cancel_on_signals();
            crate::worker::run(&settings, agents, shutdown).await?;
            Ok(())
        }
        Command::Dev(args) => dev::run(settings, args).await,
        Command::Submit(args) => submit(&settings, args).await,
        Command::Locks(args) => locks(&settings, args).await,
        Command::Bench(args) => bench::run(settings, args).await,
        Command::BenchFloorWorker(args) => bench_floor::run_worker(&settings, args).await,
        Command::BenchSchedulerMemory => bench::scheduler_memory(&settings).await,
        Command::Patterns(command) => patterns::run_patterns(&settings, command),
        Command::Run(args) => patterns::run(&settings, args).await,
        Command::Simulate(args) => simulate::run(settings, args).await,
        Command::Token(command) => token::run(&settings, command).await,
        Command::NatsAuth(args) => nats_auth::run(&settings, args),
    }
}

async fn submit(settings: &Settings, args: SubmitArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("read {}", args.file.display()))?;
    let is_json = args.file.extension().is_some_and(|e| e == "json");
    let spec: crate::domain::dag::WorkflowSpec = if is_json {
        serde_json::from_str(&text).with_context(|| format!("parse {}", args.file.display()))?
    } else {
        serde_norway::from_str(&text).with_context(|| format!("parse {}", args.file.display()))?
    };
    let names = crate::bus::Names::new(&settings.namespace).map_err(anyhow::Error::msg)?;
    let nats =
        crate::bus::connect_once(crate::bus::NatsAccess::from_settings(settings), "omoi-cli")
            .await?;
    let client = crate::client::WorkflowClient::new(nats, names);
    let submitted = client.submit(&spec).await?;
    if submitted.tasks_omitted {
        eprintln!(
            "task ids left out: the reply would not fit in one NATS message \
             (`GET /api/v1/workflows/{}` lists them)",
            submitted.workflow_id
        );
    }
    if !args.wait {
        println!("{}", serde_json::to_string_pretty(&submitted)?);
        return Ok(());
    }
    eprintln!("submitted workflow {}; waiting", submitted.workflow_id);
    // A line on stderr whenever the counts change (stdout is for the final state).
    let mut last = String::new();
    let view = client
        .wait_with(
            submitted.workflow_id,
            std::time::Duration::from_secs(args.timeout),
            |view| {
                let total: usize = view.counts.values().sum();
                let parts: Vec<String> = view
                    .counts
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(status, n)| format!("{n} {status}"))
                    .collect();
                let line = format!("progress: {} (of {total})", parts.join(", "));
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            },
        )
        .await?;
    println!("{}", serde_json::to_string_pretty(&view)?);
    if view.workflow.status != crate::domain::WorkflowStatus::Completed {
        anyhow::bail!(
            "workflow {} ended {}",
            view.workflow.id,
            view.workflow.status
        );
    }
    Ok(())
}

async fn locks(settings: &Settings, args: LocksArgs) -> anyhow::Result<()> {
    let names = crate::bus::Names::new(&settings.namespace).map_err(anyhow::Error::msg)?;
    let nats =
        crate::bus::connect_once(crate::bus::NatsAccess::from_settings(settings), "omoi-cli")
            .await?;
    let js = async_nats::jetstream::new(nats);
    let kv =
        crate::bus::provision::open_bucket(&js, &names, crate::bus::names::BUCKET_LOCKS).await?;
    let manager = crate::bus::kv_lock::LockManager::new(
        kv,
        std::time::Duration::from_millis(settings.lock_lease_ms),
    );
    if let Some(name) = args.release {
        let released = manager.force_release(&name).await?;
        eprintln!("{}", if released { "released" } else { "not held" });
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp_millis();
    let mut held = 0;
    for (name, lock) in manager.list().await? {
        for h in lock.live_holders(now) {
            held += 1;
            println!(
                "{name}\t{}\tholder={}\tagent={}\texpires_in_ms={}",
                lock.mode
                    .map(|m| format!("{m:?}").to_lowercase())
                    .unwrap_or_default(),
                h.owner,
                h.agent_id.as_deref().unwrap_or("-"),
                h.expires_at_ms - now
            );
        }
        for w in lock.live_waiters(now) {
            println!(
                "{name}\twaiting\towner={}\tsince_ms_ago={}",
                w.owner,
                now - w.since_ms
            );
        }
    }
    if held == 0 {
        eprintln!("no locks held");
    }
    Ok(())
}

/// `worker-<hostname>`: distinct per container when a worker service is scaled out.
fn default_agent_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| std::process::id().to_string());
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("worker-{clean}")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
