//! The per-test environment.

use std::time::Duration;

use async_nats::jetstream;
use omoi::bus::{EventBus, Names, provision};
use omoi::config::Settings;
use sqlx::PgPool;

/// NATS for tests (`OMOI_TEST_NATS_URL`, default the local server).
pub fn nats_url() -> String {
    std::env::var("OMOI_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A TCP port on 127.0.0.1 that nothing listens on (for a private server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL URL whose database is only used to create and drop per-test databases
/// (`OMOI_TEST_DATABASE_URL`, default the local server's `postgres` database).
pub fn admin_database_url() -> String {
    std::env::var("OMOI_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct TestEnv {
    pub names: Names,
    /// The NATS server(s) of this environment (comma-separated for a cluster).
    pub nats_url: String,
    /// The admin token the control planes of this environment are bootstrapped with.
    pub admin_token: String,
    pub database_url: String,
    db_name: String,
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub bus: EventBus,
}

impl TestEnv {
    /// A fresh namespace and database, migrated and provisioned.
    pub async fn new() -> Self {
        Self::on_nats(nats_url()).await
    }

    /// [`TestEnv::new`] on the NATS server(s) `nats_url` (comma-separated for a cluster).
    pub async fn on_nats(nats_url: String) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("t{}", &suffix[..12]);
        let db_name = format!("omoi_test_{}", &suffix[..12]);
        let admin = PgPool::connect(&admin_database_url())
            .await
            .expect("admin database");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let database_url = replace_database(&admin_database_url(), &db_name);
        let pool = omoi::db::connect(&database_url, 5).await.unwrap();
        omoi::db::migrate(&pool).await.unwrap();
        let names = Names::new(&ns).unwrap();
        let nats = omoi::bus::connect(omoi::bus::NatsAccess::anonymous(&nats_url), "omoi-test")
            .await
            .unwrap();
        let js = jetstream::new(nats.clone());
        provision::ensure_all(&js, &names, 0).await.unwrap();
        let bus = EventBus::new(js.clone(), names.clone());
        Self {
            names,
            nats_url,
            admin_token: omoi::service::tokens::generate(),
            database_url,
            db_name,
            pool,
            nats,
            js,
            bus,
        }
    }

    /// Settings pointing at this environment, with fast liveness timings.
    pub fn settings(&self) -> Settings {
        Settings {
            namespace: self.names.namespace().to_string(),
            nats_url: self.nats_url.clone(),
            database_url: self.database_url.clone(),
            http_addr: "127.0.0.1:0".into(),
            heartbeat_interval_ms: 100,
            agent_stale_after_ms: 400,
            agent_offline_after_ms: 1_000,
            leader_lease_ms: 1_500,
            shutdown_grace_ms: 3_000,
            retry_base_delay_ms: 100,
            retry_max_delay_ms: 1_000,
            lock_lease_ms: 2_000,
            lock_wait_ms: 5_000,
            task_start_timeout_ms: 5_000,
            bootstrap_admin_token: self.admin_token.clone(),
            ..Settings::default()
        }
    }

    /// Environment variables that point an `omoi` child process at this environment: every
    /// setting as its `OMOI_` variable.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut settings = self.settings();
        settings.log_level = "warn".into();
        let serde_json::Value::Object(map) = serde_json::to_value(&settings).unwrap() else {
            unreachable!("settings serialise to an object")
        };
        map.into_iter()
            .map(|(k, v)| {
                let value = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (format!("OMOI_{}", k.to_uppercase()), value)
            })
            .collect()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let names = self.names.clone();
        let db_name = self.db_name.clone();
        let nats_url = self.nats_url.clone();
        // Async clean-up from a synchronous Drop (also on panic): a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                // The pool's connections belong to the test's runtime, which this thread blocks:
                // FORCE terminates them server-side instead of waiting for a close.
                let servers: Vec<&str> = nats_url.split(',').collect();
                if let Ok(nats) = async_nats::connect(servers).await {
                    let _ = provision::delete_all(&jetstream::new(nats), &names).await;
                }
                if let Ok(admin) = PgPool::connect(&admin_database_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
                    )))
                    .execute(&admin)
                    .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

pub fn replace_database(url: &str, db: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("database url");
    parsed.set_path(&format!("/{db}"));
    parsed.to_string()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
