//! The command line: one subcommand per file. Data goes to stdout, diagnostics to stderr.

mod dev;

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
    Migrate,
    /// Print the effective configuration (secrets masked).
    Config,
    /// Run a control plane and N workers in one process, for development.
    Dev(dev::DevArgs),
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
    let settings = Settings::load(&cli.global.sources())?;
    telemetry::init_tracing(settings.log_format, &settings.log_level);
    let _ = telemetry::prometheus();
    match cli.command {
        Command::Config => {
            print!("{}", settings.render_toml());
            Ok(())
        }
        Command::Migrate => {
            if crate::db::ensure_database(&settings.database_url).await? {
                eprintln!(
                    "created database {}",
                    crate::config::mask_url_password(&settings.database_url)
                );
            }
            crate::coordinator::migrate(&settings).await?;
            eprintln!(
                "migrations applied; streams and buckets of namespace `{}` ready",
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
            let shutdown = Shutdown::new();
            shutdown.cancel_on_signals();
            crate::worker::run(&settings, agents, shutdown).await?;
            Ok(())
        }
        Command::Dev(args) => dev::run(settings, args).await,
    }
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
