//! Everything that talks to PostgreSQL: the pool, migrations, and one repository per
//! aggregate. State changes are compare-and-set updates (`… WHERE status = $expected`).

pub mod agents;
pub mod collaboration;
pub mod coordination;
pub mod outbox;
pub mod scheduling;
pub mod tasks;
pub mod tokens;
pub mod workflows;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::domain::IllegalTransition;

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("connect to PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrate: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id} changed concurrently: expected {expected}, found {actual}")]
    Conflict {
        what: &'static str,
        id: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("{0}")]
    Duplicate(String),
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
}

impl DbError {
    /// Whether connecting failed because the database named in the URL does not exist.
    pub fn is_missing_database(&self) -> bool {
        matches!(self, Self::Connect { source: sqlx::Error::Database(d), .. }
            if d.code().as_deref() == Some("3D000"))
    }

    /// Whether trying the same thing again later may succeed: the server or the connection is
    /// unavailable, overloaded, shutting down, or the transaction lost a race. Otherwise the
    /// statement itself was refused (bad data, a broken constraint) and would be refused again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Sqlx(e) => match e {
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    // 08 connection, 40 rollback (serialization, deadlock), 53 resources,
                    // 57 operator intervention (shutdown), 58 system error.
                    ["08", "40", "53", "57", "58"]
                        .iter()
                        .any(|class| c.starts_with(class))
                }),
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                _ => false,
            },
            _ => false,
        }
    }
}

/// Connects a pool. Fails fast (a few seconds) when nothing answers, naming the URL.
///
/// Its connections run with two settings (each unless the URL's `options` name it):
/// - no JIT compilation (`jit=off`): omoi's statements are short, and some on large workflows
///   are estimated costly enough to be compiled first — the view of a 100,000-task workflow
///   spent 624 ms compiling for about 145 ms of work;
/// - a plan for each run of a statement with parameters (`plan_cache_mode=force_custom_plan`):
///   PostgreSQL may otherwise keep, for good, a generic plan made while `tasks` was small — a
///   scan of the whole table — and a 100,000-task workflow submitted next had each completion
///   read every task until autovacuum's statistics came (1,200–1,300 tasks/s instead of 3,600,
///   PostgreSQL 0.63 CPU s per 1,000 tasks instead of 0.10). The scheduler's steps run on a
///   connection of their own settings instead ([`scheduling::make_hot`]).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let masked = crate::config::mask_url_password(url);
    let mut options: PgConnectOptions = url.parse().map_err(|source| DbError::Connect {
        url: masked.clone(),
        source,
    })?;
    for (name, value) in [("jit", "off"), ("plan_cache_mode", "force_custom_plan")] {
        if !options.get_options().is_some_and(|o| o.contains(name)) {
            options = options.options([(name, value)]);
        }
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect {
            url: masked,
            source,
        })
}

/// Applies pending migrations; a no-op when all are applied. Concurrent callers are serialised
/// by sqlx's advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Creates the database named in `url` if it does not exist, connecting to the `postgres`
/// maintenance database of the same server. Returns true if it was created.
pub async fn ensure_database(url: &str) -> Result<bool, DbError> {
    let masked = crate::config::mask_url_password(url);
    let options: PgConnectOptions = url.parse().map_err(|source| DbError::Connect {
        url: masked.clone(),
        source,
    })?;
    let Some(name) = options.get_database().map(str::to_string) else {
        return Ok(false);
    };
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.database("postgres"))
        .await
        .map_err(|source| DbError::Connect {
            url: masked.clone(),
            source,
        })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await?;
    if exists {
        return Ok(false);
    }
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&admin)
        .await
    {
        Ok(_) => Ok(true),
        // Created by someone else in the meantime.
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P04") => Ok(false),
        Err(e) => Err(e.into()),
    }
}
