//! Settings: defaults in the binary → optional `omoi.toml` → `OMOI_` environment → CLI flags,
//! then [`Settings::validate`]. Every key is flat (`heartbeat_interval_ms`, not a table) so that
//! each one has exactly one environment name: `OMOI_` + the key in upper case.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the settings could not be loaded. Always names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// The effective configuration of one omoi process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Prefix of every subject, stream and KV bucket (`<ns>.task.completed`, `<ns>_events`).
    pub namespace: String,
    /// One NATS server, or several comma-separated (the servers of a cluster: a client that
    /// loses one reconnects to another).
    pub nats_url: String,
    /// Replicas of every stream and bucket `omoi migrate` and the control plane provision
    /// (3 on a 3-node cluster); 0 keeps what each has (a new one gets 1).
    pub nats_replicas: u32,
    /// An NKEY seed file to sign in to NATS with (`omoi nats-auth` writes them).
    pub nats_nkey_file: String,
    /// A NATS credentials (JWT) file, for operator-mode servers.
    pub nats_creds_file: String,
    pub database_url: String,
    pub http_addr: String,
    pub log_format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `omoi=debug,info`.
    pub log_level: String,
    pub db_max_connections: u32,
    /// How often a worker publishes a heartbeat per hosted agent.
    pub heartbeat_interval_ms: u64,
    /// Silence after which the control plane marks an agent `stale`.
    pub agent_stale_after_ms: u64,
    /// Silence after which the control plane marks an agent `offline`.
    pub agent_offline_after_ms: u64,
    /// First retry delay of a failed task attempt; doubles per failure.
    pub retry_base_delay_ms: u64,
    /// Upper bound of the retry delay.
    pub retry_max_delay_ms: u64,
    /// Time a stopping process gives in-flight work before it exits anyway.
    pub shutdown_grace_ms: u64,
    /// Time-to-live of the scheduler leader lease; a standby takes over after it lapses.
    pub leader_lease_ms: u64,
    /// Lease of a resource lock; the holder renews it while the task runs, and a dead holder's
    /// lock can be taken over once it lapses.
    pub lock_lease_ms: u64,
    /// How long a worker waits for a busy lock before handing the task back as blocked.
    pub lock_wait_ms: u64,
    /// A dispatched task not started within this time is dispatched again.
    pub task_start_timeout_ms: u64,
    /// Most tasks one worker process runs at once, over all its agents (0 = the sum of their
    /// capacities).
    pub worker_max_concurrency: u32,
    /// A handoff not decided within this time expires (a request may ask for another).
    pub handoff_ttl_ms: u64,
    /// Where a worker appends each inbox item it receives, one JSON line per item, in
    /// `<dir>/<agent name>.jsonl` (empty: items are only logged).
    pub worker_inbox_dir: String,
    /// Directories searched for pattern files by name (`omoi run NAME`, the from-pattern API),
    /// separated by `:`, after the built-in patterns.
    pub patterns_dir: String,
    /// Longest a worker runs a task that sets no `timeout_seconds`.
    pub executor_timeout_ms: u64,
    /// Executors a worker offers, comma-separated, of `echo,sleep,sim,shell,http`; `shell` and
    /// `http` run only when named here.
    pub worker_executors: String,
    /// Where a worker's `http` executor may connect: `public`, host names, addresses and CIDR
    /// networks, comma-separated (private and loopback ranges only when named).
    pub http_executor_allow: String,
    /// Open HTTP connections a control plane serves at once; more are closed on arrival.
    pub http_max_connections: u32,
    /// Time a client has to send a request's headers; also the longest a keep-alive
    /// connection may sit idle.
    pub http_header_timeout_ms: u64,
    /// Longest an HTTP request may take, body included (WebSockets excepted once upgraded).
    pub http_request_timeout_ms: u64,
    /// Largest HTTP request body (413 `too_large` past it). Bodies being read at once are
    /// bounded to four times this.
    pub http_max_body_bytes: u64,
    /// API requests handled at once; more get 503 `unavailable` at once (health checks and
    /// metrics are exempt).
    pub http_max_in_flight: u32,
    /// `token`: every API request, WebSocket and `/metrics` needs a bearer token; `open`: no
    /// authentication at all (trusted networks only; the control plane warns at start).
    pub http_auth: HttpAuth,
    /// An admin token kept in the database under the name `bootstrap` (a secret, at least 24
    /// characters; set it from a secret store as `OMOI_BOOTSTRAP_ADMIN_TOKEN`).
    pub bootstrap_admin_token: String,
    /// Origins (`https://dash.example.com`) whose pages may open the WebSockets, besides the
    /// control plane's own; comma-separated.
    pub http_allowed_origins: String,
}

/// How the HTTP API authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpAuth {
    Token,
    Open,
}

impl Settings {
    /// The directories of `patterns_dir`.
    pub fn pattern_dirs(&self) -> Vec<std::path::PathBuf> {
        self.patterns_dir
            .split(':')
            .filter(|d| !d.trim().is_empty())
            .map(std::path::PathBuf::from)
            .collect()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "omoi".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_replicas: 0,
            nats_nkey_file: String::new(),
            nats_creds_file: String::new(),
            database_url: "postgres://postgres@127.0.0.1:5432/omoi".into(),
            http_addr: "127.0.0.1:8080".into(),
            log_format: LogFormat::Human,
            log_level: "info".into(),
            db_max_connections: 10,
            heartbeat_interval_ms: 1_000,
            agent_stale_after_ms: 3_000,
            agent_offline_after_ms: 10_000,
            retry_base_delay_ms: 500,
            retry_max_delay_ms: 60_000,
            shutdown_grace_ms: 10_000,
            leader_lease_ms: 5_000,
            lock_lease_ms: 15_000,
            lock_wait_ms: 10_000,
            task_start_timeout_ms: 30_000,
            worker_max_concurrency: 0,
            handoff_ttl_ms: 300_000,
            worker_inbox_dir: String::new(),
            patterns_dir: String::new(),
            executor_timeout_ms: 3_600_000,
            worker_executors: crate::worker::policy::DEFAULT_EXECUTORS.into(),
            http_executor_allow: crate::worker::policy::DEFAULT_HTTP_ALLOW.into(),
            http_max_connections: 1_024,
            http_header_timeout_ms: 10_000,
            http_request_timeout_ms: 30_000,
            http_max_body_bytes: 16 * 1024 * 1024,
            http_max_in_flight: 256,
            http_auth: HttpAuth::Token,
            bootstrap_admin_token: String::new(),
            http_allowed_origins: String::new(),
        }
    }
}

/// Where settings come from, besides the defaults. The environment is passed in (rather than
/// read here) so tests can load settings in parallel without touching the process environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// An explicit file (must exist). Without it, `./omoi.toml` is read if present.
    pub file: Option<PathBuf>,
    pub env: HashMap<String, String>,
    /// `(key, value)` pairs from CLI flags; they win over everything.
    pub overrides: Vec<(&'static str, String)>,
}

impl Sources {
    /// Sources with the current process environment.
    pub fn from_process_env() -> Self {
        Self {
            env: std::env::vars().collect(),
            ..Self::default()
        }
    }
}

const DEFAULT_FILE: &str = "omoi.toml";

impl Settings {
    /// Loads and validates settings from `sources` layered over the defaults.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut builder = config::Config::builder().add_source(defaults);

        match &sources.file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::File {
                        path: path.clone(),
                        reason: "no such file".into(),
                    });
                }
                builder = builder.add_source(file_source(path));
            }
            None if Path::new(DEFAULT_FILE).is_file() => {
                builder = builder.add_source(file_source(Path::new(DEFAULT_FILE)));
            }
            None => {}
        }

        let omoi_env: config::Map<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("OMOI_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("OMOI")
                .prefix_separator("_")
                .source(Some(omoi_env.clone())),
        );
        // Conventional names are fallbacks: they lose to OMOI_* but beat the file and defaults.
        for (fallback, key, omoi) in [
            ("NATS_URL", "nats_url", "OMOI_NATS_URL"),
            ("DATABASE_URL", "database_url", "OMOI_DATABASE_URL"),
        ] {
            if let (Some(v), false) = (sources.env.get(fallback), omoi_env.contains_key(omoi)) {
                builder = builder
                    .set_override(key, v.clone())
                    .map_err(|e| ConfigError::Parse(e.to_string()))?;
            }
        }
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(*key, value.clone())
                .map_err(|e| ConfigError::Parse(e.to_string()))?;
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value; the error names the key and says why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_namespace(&self.namespace).map_err(|reason| ConfigError::Invalid {
            key: "namespace",
            reason,
        })?;
        if nats_urls(&self.nats_url).next().is_none() {
            return Err(ConfigError::Invalid {
                key: "nats_url",
                reason: "no NATS server given".into(),
            });
        }
        for url in nats_urls(&self.nats_url) {
            check_url(url, &["nats", "tls", "ws", "wss"]).map_err(|reason| {
                ConfigError::Invalid {
                    key: "nats_url",
                    reason,
                }
            })?;
        }
        if self.nats_replicas > 5 {
            return Err(ConfigError::Invalid {
                key: "nats_replicas",
                reason: format!(
                    "{} replicas: JetStream allows at most 5",
                    self.nats_replicas
                ),
            });
        }
        check_url(&self.database_url, &["postgres", "postgresql"]).map_err(|reason| {
            ConfigError::Invalid {
                key: "database_url",
                reason,
            }
        })?;
        self.http_addr
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Invalid {
                key: "http_addr",
                reason: format!("`{}` is not host:port ({e})", self.http_addr),
            })?;
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            ConfigError::Invalid {
                key: "log_level",
                reason: e.to_string(),
            }
        })?;
        let positive = [
            ("db_max_connections", u64::from(self.db_max_connections)),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("retry_base_delay_ms", self.retry_base_delay_ms),
            ("leader_lease_ms", self.leader_lease_ms),
            ("lock_lease_ms", self.lock_lease_ms),
            ("task_start_timeout_ms", self.task_start_timeout_ms),
            ("handoff_ttl_ms", self.handoff_ttl_ms),
            ("executor_timeout_ms", self.executor_timeout_ms),
            ("http_max_connections", u64::from(self.http_max_connections)),
            ("http_header_timeout_ms", self.http_header_timeout_ms),
            ("http_request_timeout_ms", self.http_request_timeout_ms),
            ("http_max_body_bytes", self.http_max_body_bytes),
            ("http_max_in_flight", u64::from(self.http_max_in_flight)),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        if self.agent_stale_after_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Invalid {
                key: "agent_stale_after_ms",
                reason: format!(
                    "must exceed heartbeat_interval_ms ({}), or every agent would go stale",
                    self.heartbeat_interval_ms
                ),
            });
        }
        if self.agent_offline_after_ms <= self.agent_stale_after_ms {
            return Err(ConfigError::Invalid {
                key: "agent_offline_after_ms",
                reason: format!(
                    "must exceed agent_stale_after_ms ({})",
                    self.agent_stale_after_ms
                ),
            });
        }
        crate::worker::policy::parse_executors(&self.worker_executors).map_err(|reason| {
            ConfigError::Invalid {
                key: "worker_executors",
                reason,
            }
        })?;
        crate::worker::policy::HttpAllow::parse(&self.http_executor_allow).map_err(|reason| {
            ConfigError::Invalid {
                key: "http_executor_allow",
                reason,
            }
        })?;
        if !self.bootstrap_admin_token.is_empty()
            && self.bootstrap_admin_token.chars().count()
                < crate::service::tokens::MIN_BOOTSTRAP_CHARS
        {
            return Err(ConfigError::Invalid {
                key: "bootstrap_admin_token",
                reason: format!(
                    "must be at least {} characters",
                    crate::service::tokens::MIN_BOOTSTRAP_CHARS
                ),
            });
        }
        for origin in self.allowed_origins() {
            let ok = url::Url::parse(&origin)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/");
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "http_allowed_origins",
                    reason: format!("`{origin}` is not an origin like https://host[:port]"),
                });
            }
        }
        if !self.nats_nkey_file.is_empty() && !self.nats_creds_file.is_empty() {
            return Err(ConfigError::Invalid {
                key: "nats_creds_file",
                reason: "give either nats_nkey_file or nats_creds_file, not both".into(),
            });
        }
        if self.retry_max_delay_ms < self.retry_base_delay_ms {
            return Err(ConfigError::Invalid {
                key: "retry_max_delay_ms",
                reason: "must be at least retry_base_delay_ms".into(),
            });
        }
        Ok(())
    }

    /// A copy safe to print: passwords in URLs and secrets are replaced by `***`.
    pub fn redacted(&self) -> Self {
        let secret = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                "***".into()
            }
        };
        Self {
            nats_url: mask_nats_urls(&self.nats_url),
            database_url: mask_url_password(&self.database_url),
            bootstrap_admin_token: secret(&self.bootstrap_admin_token),
            ..self.clone()
        }
    }

    /// The origins of `http_allowed_origins`.
    pub fn allowed_origins(&self) -> Vec<String> {
        self.http_allowed_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect()
    }

    /// The effective settings as `key = value` lines (valid TOML), secrets masked.
    pub fn render_toml(&self) -> String {
        let value = serde_json::to_value(self.redacted()).unwrap_or_default();
        let mut out = String::new();
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn agent_stale_after(&self) -> Duration {
        Duration::from_millis(self.agent_stale_after_ms)
    }
    pub fn agent_offline_after(&self) -> Duration {
        Duration::from_millis(self.agent_offline_after_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    pub fn leader_lease(&self) -> Duration {
        Duration::from_millis(self.leader_lease_ms)
    }
    pub fn retry_policy(&self) -> crate::domain::RetryPolicy {
        crate::domain::RetryPolicy {
            base_delay: Duration::from_millis(self.retry_base_delay_ms),
            max_delay: Duration::from_millis(self.retry_max_delay_ms),
        }
    }
}

fn file_source(path: &Path) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(path.to_path_buf()).format(config::FileFormat::Toml)
}

/// Namespace grammar: `[a-z][a-z0-9_-]{0,31}` — valid as a subject token, a stream name and a KV
/// bucket name, and short enough to read in `nats stream ls`.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let mut chars = ns.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !c.is_ascii_lowercase() => {
            return Err(format!("`{ns}` must start with a lower-case letter"));
        }
        _ => {}
    }
    if ns.len() > 32 {
        return Err(format!("`{ns}` is longer than 32 characters"));
    }
    if let Some(bad) =
        chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "`{ns}` contains `{bad}`; allowed are a-z, 0-9, `_` and `-`"
        ));
    }
    Ok(())
}

fn check_url(raw: &str, schemes: &[&str]) -> Result<(), String> {
    let url = url::Url::parse(raw)
        .map_err(|e| format!("`{}` is not a URL ({e})", mask_url_password(raw)))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "scheme `{}` is not one of {}",
            url.scheme(),
            schemes.join(", ")
        ));
    }
    Ok(())
}

/// The servers of a `nats_url` (comma-separated), trimmed; empty entries skipped.
pub fn nats_urls(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// A `nats_url` (one server or several) with every password replaced by `***`.
pub fn mask_nats_urls(raw: &str) -> String {
    nats_urls(raw)
        .map(mask_url_password)
        .collect::<Vec<_>>()
        .join(",")
}

/// Replaces the password of a URL with `***`; a string that is not a URL is returned unchanged.
pub fn mask_url_password(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_validate() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("omoi.toml");
        std::fs::write(
            &file,
            "namespace = \"fromfile\"\nhttp_addr = \"127.0.0.1:9000\"\nlog_level = \"debug\"\n",
        )
        .unwrap();
        let sources = Sources {
            file: Some(file),
            env: env(&[("OMOI_NAMESPACE", "fromenv"), ("OMOI_LOG_LEVEL", "warn")]),
            overrides: vec![("namespace", "fromflag".into())],
        };
        let s = Settings::load(&sources).unwrap();
        assert_eq!(s.namespace, "fromflag");
        assert_eq!(s.log_level, "warn", "env beats file");
        assert_eq!(s.http_addr, "127.0.0.1:9000", "file beats default");
        assert_eq!(s.retry_base_delay_ms, 500, "default kept");
    }

    #[test]
    fn conventional_urls_are_fallbacks_only() {
        let s = Settings::load(&Sources {
            env: env(&[("NATS_URL", "nats://10.0.0.1:4222")]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.nats_url, "nats://10.0.0.1:4222");
        let s = Settings::load(&Sources {
            env: env(&[
                ("DATABASE_URL", "postgres://a@b/c"),
                ("OMOI_DATABASE_URL", "postgres://x@y/z"),
            ]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.database_url, "postgres://x@y/z");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("OMOI_NAMESPACE", "Has.Dots", "namespace"),
            ("OMOI_HTTP_ADDR", "nonsense", "http_addr"),
            ("OMOI_NATS_URL", "http://x:1", "nats_url"),
            ("OMOI_HEARTBEAT_INTERVAL_MS", "abc", "heartbeat_interval_ms"),
            ("OMOI_AGENT_STALE_AFTER_MS", "10", "agent_stale_after_ms"),
            ("OMOI_LOG_FORMAT", "xml", "log_format"),
        ];
        for (var, value, key) in cases {
            let err = Settings::load(&Sources {
                env: env(&[(var, value)]),
                ..Sources::default()
            })
            .expect_err(var)
            .to_string();
            assert!(
                err.contains(key),
                "{var}={value}: `{err}` should name `{key}`"
            );
        }
    }

    #[test]
    fn a_cluster_is_a_comma_separated_list_each_checked_and_masked() {
        let cluster = Settings {
            nats_url: "nats://n1:4222, nats://u:p4ss@n2:4222,nats://n3:4222".into(),
            nats_replicas: 3,
            ..Settings::default()
        };
        cluster.validate().unwrap();
        assert_eq!(nats_urls(&cluster.nats_url).count(), 3);
        let shown = cluster.render_toml();
        assert!(
            !shown.contains("p4ss") && shown.contains("nats://n3:4222"),
            "{shown}"
        );
        for (url, replicas) in [
            ("nats://n1:4222,http://n2:80", 0),
            (" , ", 0),
            ("nats://n1:4222", 7),
        ] {
            let bad = Settings {
                nats_url: url.into(),
                nats_replicas: replicas,
                ..Settings::default()
            };
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains("nats_"), "{url} {replicas}: {err}");
        }
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Settings::load(&Sources {
            file: Some("/nonexistent/omoi.toml".into()),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/omoi.toml"));
    }

    #[test]
    fn secrets_are_masked() {
        let s = Settings {
            database_url: "postgres://omoi:hunter2@db:5432/omoi".into(),
            nats_url: "nats://u:p4ss@nats:4222".into(),
            ..Settings::default()
        };
        let printed = s.render_toml();
        assert!(
            !printed.contains("hunter2") && !printed.contains("p4ss"),
            "{printed}"
        );
        let with_token = Settings {
            bootstrap_admin_token: "a-very-secret-bootstrap-token".into(),
            ..Settings::default()
        };
        let shown = with_token.render_toml();
        assert!(!shown.contains("a-very-secret"), "{shown}");
        assert!(shown.contains("bootstrap_admin_token = \"***\""), "{shown}");
        assert!(
            printed.contains("postgres://omoi:***@db:5432/omoi"),
            "{printed}"
        );
    }
}
