//! The outbox table: the messages a transaction announces, written as one row in that
//! transaction, read back only when their publisher did not see them stored (a crash), deleted
//! once stored.

use sqlx::{PgConnection, PgPool};

use super::DbError;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// `Nats-Msg-Id`: the event's id.
    pub msg_id: String,
    pub subject: String,
    pub payload: Vec<u8>,
}

/// Stores `rows`, in order, as one batch in the caller's transaction; returns its sequence
/// number (`None` for no rows: nothing is written).
pub async fn insert(conn: &mut PgConnection, rows: &[OutboxRow]) -> Result<Option<i64>, DbError> {
    if rows.is_empty() {
        return Ok(None);
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.msg_id.as_str()).collect();
    let subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
    let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
    let seq = sqlx::query_scalar(
        "INSERT INTO outbox_batches (msg_ids, subjects, payloads) VALUES ($1, $2, $3)
         RETURNING seq",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&payloads)
    .fetch_one(conn)
    .await?;
    Ok(Some(seq))
}

/// Forgets batches JetStream has stored whole.
pub async fn delete(pool: &PgPool, seqs: &[i64]) -> Result<(), DbError> {
    if seqs.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox_batches WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(pool)
        .await?;
    Ok(())
}

/// How many messages wait in the outbox.
pub async fn pending_messages(pool: &PgPool) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(sum(cardinality(msg_ids)), 0)::bigint FROM outbox_batches",
    )
    .fetch_one(pool)
    .await?)
}

/// A batch as stored: its sequence number, then its messages' ids, subjects and payloads.
type BatchRow = (i64, Vec<String>, Vec<String>, Vec<Vec<u8>>);

/// Up to `limit` batches older than `older_than_ms`, oldest first: what no publisher saw
/// stored.
pub async fn leftovers(
    pool: &PgPool,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<(i64, Vec<OutboxRow>)>, DbError> {
    let batches: Vec<BatchRow> = sqlx::query_as(
        "SELECT seq, msg_ids, subjects, payloads FROM outbox_batches
         WHERE created_at <= now() - make_interval(secs => $1::float8 / 1000)
         ORDER BY seq LIMIT $2",
    )
    .bind(older_than_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(batches
        .into_iter()
        .map(|(seq, ids, subjects, payloads)| {
            let rows = ids
                .into_iter()
                .zip(subjects)
                .zip(payloads)
                .map(|((msg_id, subject), payload)| OutboxRow {
                    msg_id,
                    subject,
                    payload,
                })
                .collect();
            (seq, rows)
        })
        .collect())
}
