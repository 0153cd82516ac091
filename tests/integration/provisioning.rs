//! Migrations and JetStream provisioning are idempotent.

use omoi::bus::names::{BUCKET_AGENTS, STREAM_DEADLETTER, STREAM_EVENTS};
use omoi::bus::provision;

use crate::env::TestEnv;

#[tokio::test]
async fn applying_migrations_twice_is_a_no_op() {
    let env = TestEnv::new().await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let before = count().await;
    assert_eq!(before as usize, omoi::db::MIGRATOR.iter().count());
    omoi::db::migrate(&env.pool).await.unwrap();
    omoi::db::migrate(&env.pool).await.unwrap();
    assert_eq!(count().await, before);
}

#[tokio::test]
async fn provisioning_twice_keeps_streams_and_buckets_as_defined() {
    let env = TestEnv::new().await;
    let mut events = env
        .js
        .get_stream(env.names.stream(STREAM_EVENTS))
        .await
        .unwrap();
    let first = events.info().await.unwrap().config.clone();
    // Concurrent provisioning from several processes must also be safe.
    let (a, b) = tokio::join!(
        provision::ensure_all(&env.js, &env.names, 0),
        provision::ensure_all(&env.js, &env.names, 0)
    );
    a.unwrap();
    b.unwrap();
    let again = events.info().await.unwrap().config.clone();
    assert_eq!(first.subjects, again.subjects);
    assert_eq!(first.duplicate_window, again.duplicate_window);
    assert!(again.description.unwrap().starts_with("omoi events"));
    let mut dl = env
        .js
        .get_stream(env.names.stream(STREAM_DEADLETTER))
        .await
        .unwrap();
    assert!(dl.info().await.unwrap().config.description.is_some());
    let kv = provision::open_bucket(&env.js, &env.names, BUCKET_AGENTS)
        .await
        .unwrap();
    kv.put("k", "v".into()).await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().unwrap(), "v");
}
