//! Everything that talks to NATS: names, provisioning, typed events, consumers with
//! dead-lettering, the KV lease, connecting with credentials, and the permissions of each kind
//! of user (permissions.rs).

pub mod consume;
pub mod events;
pub mod kv_lock;
pub mod lease;
pub mod names;
pub mod permissions;
pub mod provision;

pub use consume::{Delivery, TypedConsumer};
pub use events::EventBus;
pub use names::Names;

/// Errors of the bus layer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("publish to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    #[error("provision {what}: {reason}")]
    Provision { what: String, reason: String },
    #[error("consumer on {stream}: {reason}")]
    Consumer { stream: String, reason: String },
    #[error("key-value {bucket}: {reason}")]
    Kv { bucket: String, reason: String },
    #[error("request {subject}: {reason}")]
    Request { subject: String, reason: String },
    #[error("NATS credentials {path}: {reason}")]
    Credentials { path: String, reason: String },
}

/// How to reach NATS and who to be there: an NKEY seed file or a credentials (JWT) file, or
/// neither (anonymous). Secrets are read from files, never taken from URLs or logged.
#[derive(Debug, Clone, Copy)]
pub struct NatsAccess<'a> {
    pub url: &'a str,
    /// An NKEY seed file (`SU…`), as `omoi nats-auth` writes them.
    pub nkey_file: &'a str,
    /// A `.creds` file (JWT and seed) of an operator-mode deployment.
    pub creds_file: &'a str,
}

impl<'a> NatsAccess<'a> {
    /// No credentials.
    pub fn anonymous(url: &'a str) -> Self {
        Self {
            url,
            nkey_file: "",
            creds_file: "",
        }
    }

    /// What `settings` say (`nats_url`, `nats_nkey_file`, `nats_creds_file`).
    pub fn from_settings(settings: &'a crate::config::Settings) -> Self {
        Self {
            url: &settings.nats_url,
            nkey_file: &settings.nats_nkey_file,
            creds_file: &settings.nats_creds_file,
        }
    }
}

/// The prefix of a client's reply subjects when it signs in with the NKEY `public_key`: a
/// permission can then let each user read only its own replies (`_INBOX_<key>.>`).
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX_{public_key}")
}

/// Reads an NKEY seed file: its first line starting with `S` (comments and blank lines are
/// skipped).
pub fn read_seed(path: &str) -> Result<nkeys::KeyPair, BusError> {
    let bad = |reason: String| BusError::Credentials {
        path: path.to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .ok_or_else(|| bad("no NKEY seed (a line starting with S) in it".into()))?;
    nkeys::KeyPair::from_seed(seed).map_err(|e| bad(format!("not an NKEY seed: {e}")))
}

async fn options(
    access: NatsAccess<'_>,
    name: &str,
) -> Result<async_nats::ConnectOptions, BusError> {
    let mut options = async_nats::ConnectOptions::new().name(name);
    if !access.nkey_file.is_empty() {
        let pair = read_seed(access.nkey_file)?;
        let seed = pair.seed().map_err(|e| BusError::Credentials {
            path: access.nkey_file.to_string(),
            reason: e.to_string(),
        })?;
        options = options
            .nkey(seed)
            .custom_inbox_prefix(inbox_prefix(&pair.public_key()));
    } else if !access.creds_file.is_empty() {
        options = options
            .credentials_file(access.creds_file)
            .await
            .map_err(|e| BusError::Credentials {
                path: access.creds_file.to_string(),
                reason: e.to_string(),
            })?;
    }
    Ok(options)
}

/// The servers of a (comma-separated) URL list.
fn servers(url: &str) -> Vec<&str> {
    crate::config::nats_urls(url).collect()
}

/// Connects to NATS with a client name that shows up in `nats server report connections`,
/// retrying until the server answers.
pub async fn connect(access: NatsAccess<'_>, name: &str) -> Result<async_nats::Client, BusError> {
    options(access, name)
        .await?
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(3))
        .connect(servers(access.url))
        .await
        .map_err(|source| BusError::Connect {
            url: crate::config::mask_nats_urls(access.url),
            source,
        })
}

/// Connects without retrying: fails fast when nothing listens (for `omoi dev` and readiness).
pub async fn connect_once(
    access: NatsAccess<'_>,
    name: &str,
) -> Result<async_nats::Client, BusError> {
    options(access, name)
        .await?
        .connection_timeout(std::time::Duration::from_secs(2))
        .connect(servers(access.url))
        .await
        .map_err(|source| BusError::Connect {
            url: crate::config::mask_nats_urls(access.url),
            source,
        })
}
