//! A throw-away namespace and database on the configured servers, for `omoi bench` and
//! `omoi simulate`: created, migrated and provisioned, then removed whatever happened.

use anyhow::Context;
use async_nats::jetstream;

use crate::bus::{Names, provision};
use crate::config::Settings;

pub struct Scratch {
    /// `settings` pointed at the scratch namespace and database.
    pub settings: Settings,
    pub names: Names,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    admin_url: String,
    db_name: String,
}

impl Scratch {
    /// A namespace `<prefix><random>` and a database `omoi_<namespace>`.
    pub async fn create(settings: &Settings, prefix: &str) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("{prefix}{}", &suffix[..8]);
        let names = Names::new(&ns).map_err(anyhow::Error::msg)?;
        let db_name = format!("omoi_{ns}");
        let mut db_url = url::Url::parse(&settings.database_url).context("database_url")?;
        db_url.set_path(&format!("/{db_name}"));
        let scratch_settings = Settings {
            namespace: ns,
            database_url: db_url.to_string(),
            http_addr: "127.0.0.1:0".into(),
            // Secured like any control plane, by a token nobody is told.
            http_auth: crate::config::HttpAuth::Token,
            bootstrap_admin_token: crate::service::tokens::generate(),
            ..settings.clone()
        };
        crate::db::ensure_database(&scratch_settings.database_url).await?;
        let nats = crate::bus::connect_once(
            crate::bus::NatsAccess::from_settings(settings),
            "omoi-scratch",
        )
        .await?;
        let js = jetstream::new(nats.clone());
        let scratch = Self {
            settings: scratch_settings,
            names,
            nats,
            js,
            admin_url: settings.database_url.clone(),
            db_name,
        };
        if let Err(e) = provision::ensure_all(&scratch.js, &scratch.names, 0).await {
            scratch.remove().await;
            return Err(e.into());
        }
        Ok(scratch)
    }

    /// Deletes the namespace's streams and buckets and drops the database.
    pub async fn remove(self) {
        let _ = provision::delete_all(&self.js, &self.names).await;
        let Ok(mut url) = url::Url::parse(&self.admin_url) else {
            return;
        };
        url.set_path("/postgres");
        if let Ok(pool) = crate::db::connect(url.as_str(), 1).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db_name
            )))
            .execute(&pool)
            .await;
        }
    }
}
