//! The outbox table: messages written in the transaction of the change they announce, read
//! back only when their publisher did not see them stored (a crash), deleted once stored.

use sqlx::{PgConnection, PgPool};

use super::DbError;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// `Nats-Msg-Id`: the event's id, or an inbox delivery's `msg:<message>:<agent>`.
    pub msg_id: String,
    pub subject: String,
    pub payload: Vec<u8>,
}

/// Stores `rows` in the caller's transaction (sequence numbers in the order given); returns
/// each row's sequence number, in the order of `rows`.
pub async fn insert(conn: &mut PgConnection, rows: &[OutboxRow]) -> Result<Vec<i64>, DbError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.msg_id.as_str()).collect();
    let subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
    let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
    let stored: Vec<(i64, i64)> = sqlx::query_as(
        "WITH r AS (SELECT m, s, p, n FROM UNNEST($1::text[], $2::text[], $3::bytea[])
                        WITH ORDINALITY AS r(m, s, p, n)),
              i AS (INSERT INTO outbox (msg_id, subject, payload)
                    SELECT m, s, p FROM r ORDER BY n
                    RETURNING seq, msg_id)
         SELECT i.seq, r.n FROM i JOIN r ON r.m = i.msg_id",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&payloads)
    .fetch_all(conn)
    .await?;
    let mut seqs = vec![0; rows.len()];
    for (seq, n) in stored {
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| seqs.get_mut(i)) {
            *slot = seq;
        }
    }
    Ok(seqs)
}

/// Forgets rows JetStream has stored.
pub async fn delete(pool: &PgPool, seqs: &[i64]) -> Result<(), DbError> {
    if seqs.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(pool)
        .await?;
    Ok(())
}

/// Up to `limit` rows older than `older_than_ms`, oldest first: what no publisher saw stored.
pub async fn leftovers(
    pool: &PgPool,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<(i64, OutboxRow)>, DbError> {
    let rows: Vec<(i64, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, msg_id, subject, payload FROM outbox
         WHERE created_at <= now() - make_interval(secs => $1::float8 / 1000)
         ORDER BY seq LIMIT $2",
    )
    .bind(older_than_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, msg_id, subject, payload)| {
            (
                seq,
                OutboxRow {
                    msg_id,
                    subject,
                    payload,
                },
            )
        })
        .collect())
}
