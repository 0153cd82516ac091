//! The one durable-publish helper: a change and the messages announcing it (events, inbox
//! deliveries) are committed together — the messages into the `outbox` table in the change's
//! transaction — and then published to JetStream with `Nats-Msg-Id`, in commit order, by one
//! publisher per process that nobody waits for. Stored messages are deleted from the table in
//! batches. What a crash left in the table is published again by the leader ([`Outbox::relay`]),
//! at once when it takes the lease and then for rows a publisher did not see stored; JetStream
//! drops a duplicate within its de-duplication window (2 minutes), so every committed change is
//! published once.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ServiceError;
use crate::bus::Names;
use crate::db::DbError;
use crate::db::outbox::{self, OutboxRow};
use crate::domain::{Envelope, Event};
use crate::runtime::Shutdown;

/// Messages to commit with a change.
#[derive(Debug, Default)]
pub struct Staged {
    rows: Vec<OutboxRow>,
}

impl Staged {
    /// Events, each in its envelope, on `<ns>.<type>`, its id the message id.
    pub fn events(names: &Names, events: impl IntoIterator<Item = Event>) -> Self {
        let mut staged = Self::default();
        staged.add_events(names, events);
        staged
    }

    pub fn add_events(&mut self, names: &Names, events: impl IntoIterator<Item = Event>) {
        for event in events {
            let envelope = Envelope::new(event);
            let Ok(payload) = serde_json::to_vec(&envelope) else {
                tracing::error!(
                    event = envelope.event.kind(),
                    "an event could not be encoded"
                );
                continue;
            };
            self.rows.push(OutboxRow {
                msg_id: envelope.id.to_string(),
                subject: names.event(envelope.event.kind()),
                payload,
            });
        }
    }
}

/// Messages stored in a transaction, to publish once it commits.
#[derive(Debug, Default)]
#[must_use = "publish what was committed"]
pub struct Stored {
    rows: Vec<(i64, OutboxRow)>,
}

/// Most rows deleted by one statement, and the longest an acked row waits to be deleted.
const DELETE_BATCH: usize = 2_000;
const DELETE_EVERY: Duration = Duration::from_millis(50);

/// The process's publisher of committed messages.
#[derive(Clone)]
pub struct Outbox {
    queue: mpsc::UnboundedSender<Vec<(i64, OutboxRow)>>,
    pool: PgPool,
    js: jetstream::Context,
}

impl Outbox {
    /// Starts the publisher (and the deleter of stored rows) on `shutdown`'s tracker.
    pub fn start(js: jetstream::Context, pool: PgPool, shutdown: &Shutdown) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let (acked_tx, acked_rx) = mpsc::unbounded_channel();
        let (pending_tx, pending_rx) = mpsc::channel(8_192);
        shutdown.spawn(publish_loop(
            js.clone(),
            rx,
            pending_tx,
            shutdown.token.clone(),
        ));
        shutdown.spawn(ack_loop(pending_rx, acked_tx));
        shutdown.spawn(delete_loop(pool.clone(), acked_rx));
        Self { queue, pool, js }
    }

    /// Writes `staged` into the outbox in the caller's transaction.
    pub async fn store(&self, conn: &mut PgConnection, staged: Staged) -> Result<Stored, DbError> {
        let seqs = outbox::insert(conn, &staged.rows).await?;
        Ok(Stored {
            rows: seqs.into_iter().zip(staged.rows).collect(),
        })
    }

    /// After the commit: publishes what was stored, in order, without waiting for it.
    pub fn publish(&self, stored: Stored) {
        if stored.rows.is_empty() {
            return;
        }
        if self.queue.send(stored.rows).is_err() {
            // Shutting down: the next leader publishes it from the table.
            tracing::debug!("outbox publisher stopped; the rows wait in the table");
        }
    }

    /// Commits `tx` with `staged` in it, then publishes what was stored: the one way a change
    /// and its announcements leave a process.
    pub async fn commit(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        staged: Staged,
    ) -> Result<(), ServiceError> {
        let stored = self.store(&mut tx, staged).await?;
        tx.commit().await.map_err(DbError::from)?;
        self.publish(stored);
        Ok(())
    }

    /// The leader's repair: publishes rows older than `older_than_ms` (a publisher died or was
    /// refused before JetStream stored them), oldest first, waits until each is stored and
    /// deletes them. Returns how many there were.
    pub async fn relay(&self, older_than_ms: i64) -> Result<usize, ServiceError> {
        let mut total = 0;
        loop {
            let rows = outbox::leftovers(&self.pool, older_than_ms, 1_000).await?;
            if rows.is_empty() {
                return Ok(total);
            }
            let mut acks = FuturesOrdered::new();
            for (seq, row) in &rows {
                let ack = self
                    .js
                    .send_publish(row.subject.clone(), message(row))
                    .await
                    .map_err(|e| ServiceError::Unavailable(format!("outbox relay: {e}")))?;
                acks.push_back(async move { (*seq, ack.await) });
            }
            let mut stored = Vec::with_capacity(rows.len());
            while let Some((seq, ack)) = acks.next().await {
                match ack {
                    Ok(_) => stored.push(seq),
                    Err(e) => {
                        outbox::delete(&self.pool, &stored).await?;
                        return Err(ServiceError::Unavailable(format!("outbox relay: {e}")));
                    }
                }
            }
            outbox::delete(&self.pool, &stored).await?;
            total += rows.len();
            if rows.len() < 1_000 {
                return Ok(total);
            }
        }
    }
}

fn message(row: &OutboxRow) -> PublishMessage {
    PublishMessage::build()
        .payload(row.payload.clone().into())
        .message_id(row.msg_id.clone())
}

type PendingAck = (i64, jetstream::context::PublishAckFuture);

/// Sends every committed row in the order it was committed; hands the acks on. When the
/// process stops, what is queued is still sent (what is not waits in the table).
async fn publish_loop(
    js: jetstream::Context,
    mut rx: mpsc::UnboundedReceiver<Vec<(i64, OutboxRow)>>,
    pending: mpsc::Sender<PendingAck>,
    stop: CancellationToken,
) {
    loop {
        let rows = tokio::select! {
            rows = rx.recv() => match rows { Some(r) => r, None => break },
            () = stop.cancelled() => {
                rx.close();
                match rx.recv().await { Some(r) => r, None => break }
            }
        };
        for (seq, row) in rows {
            match js.send_publish(row.subject.clone(), message(&row)).await {
                Ok(ack) => {
                    if pending.send((seq, ack)).await.is_err() {
                        return;
                    }
                }
                // Left in the table: the leader's relay publishes it again.
                Err(e) => {
                    tracing::warn!(subject = %row.subject, error = %e, "outbox publish failed; the relay retries")
                }
            }
        }
    }
}

/// Waits for acks, many at a time, and passes on the rows JetStream stored.
async fn ack_loop(mut pending: mpsc::Receiver<PendingAck>, acked: mpsc::UnboundedSender<i64>) {
    let mut waiting = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            next = pending.recv() => match next {
                Some((seq, ack)) => waiting.push(async move { (seq, ack.await) }),
                None => break,
            },
            Some((seq, result)) = waiting.next(), if !waiting.is_empty() => match result {
                Ok(_) => { let _ = acked.send(seq); }
                Err(e) => tracing::warn!(error = %e, "outbox message not stored; the relay retries"),
            },
        }
    }
    while let Some((seq, result)) = waiting.next().await {
        if result.is_ok() {
            let _ = acked.send(seq);
        }
    }
}

/// Deletes stored rows, a batch at a time.
async fn delete_loop(pool: PgPool, mut acked: mpsc::UnboundedReceiver<i64>) {
    let mut batch = Vec::with_capacity(DELETE_BATCH);
    let mut tick = tokio::time::interval(DELETE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let closed = tokio::select! {
            seq = acked.recv() => match seq {
                Some(seq) => {
                    batch.push(seq);
                    if batch.len() < DELETE_BATCH {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        if !batch.is_empty() {
            // A failed delete leaves them for the relay, which publishes them again
            // (deduplicated) and deletes them.
            if let Err(e) = outbox::delete(&pool, &batch).await {
                tracing::debug!(error = %e, "outbox delete failed");
            }
            batch.clear();
        }
        if closed {
            break;
        }
    }
}
