//! The one durable-publish helper: a change and the events announcing it are committed
//! together — the events as one row of the `outbox_batches` table in the change's transaction —
//! and then published to JetStream with `Nats-Msg-Id`, in commit order, by one publisher per
//! process that nobody waits for. A batch JetStream stored whole is deleted from the table.
//! What a crash left in the table is published again by the leader ([`Outbox::relay`]), at once
//! when it takes the lease and then for batches a publisher did not see stored; JetStream drops
//! a duplicate within its de-duplication window (2 minutes), so every committed change is
//! published once.

use std::collections::HashMap;
use std::future::IntoFuture;
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
use crate::protocol::{Envelope, Event};
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
    batch: Option<(i64, Vec<OutboxRow>)>,
}

/// Most batches deleted by one statement, and the longest a stored batch waits to be deleted.
const DELETE_BATCH: usize = 500;
const DELETE_EVERY: Duration = Duration::from_millis(50);
/// Batches the relay reads at a time.
const RELAY_BATCHES: i64 = 50;

/// The process's publisher of committed messages.
#[derive(Clone)]
pub struct Outbox {
    queue: mpsc::UnboundedSender<(i64, Vec<OutboxRow>)>,
    pool: PgPool,
    js: jetstream::Context,
}

impl Outbox {
    /// Starts the publisher (and the deleter of stored batches) on `shutdown`'s tracker.
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

    /// Writes `staged` into the outbox, as one batch, in the caller's transaction.
    pub async fn store(&self, conn: &mut PgConnection, staged: Staged) -> Result<Stored, DbError> {
        let seq = outbox::insert(conn, &staged.rows).await?;
        Ok(Stored {
            batch: seq.map(|seq| (seq, staged.rows)),
        })
    }

    /// After the commit: publishes what was stored, in order, without waiting for it.
    pub fn publish(&self, stored: Stored) {
        let Some(batch) = stored.batch else { return };
        if self.queue.send(batch).is_err() {
            // Shutting down: the next leader publishes it from the table.
            tracing::debug!("outbox publisher stopped; the batch waits in the table");
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

    /// The leader's repair: publishes batches older than `older_than_ms` (a publisher died or
    /// was refused before JetStream stored them), oldest first, waits until each message is
    /// stored and deletes them. Returns how many messages there were.
    pub async fn relay(&self, older_than_ms: i64) -> Result<usize, ServiceError> {
        let mut total = 0;
        loop {
            let batches = outbox::leftovers(&self.pool, older_than_ms, RELAY_BATCHES).await?;
            if batches.is_empty() {
                return Ok(total);
            }
            let mut stored = Vec::with_capacity(batches.len());
            for (seq, rows) in &batches {
                let result = self.relay_batch(rows).await;
                if let Err(e) = result {
                    outbox::delete(&self.pool, &stored).await?;
                    return Err(e);
                }
                stored.push(*seq);
                total += rows.len();
            }
            outbox::delete(&self.pool, &stored).await?;
            if batches.len() < RELAY_BATCHES as usize {
                return Ok(total);
            }
        }
    }

    /// Publishes one batch's messages and waits until JetStream stored them all.
    async fn relay_batch(&self, rows: &[OutboxRow]) -> Result<(), ServiceError> {
        let refused = |e: String| ServiceError::Unavailable(format!("outbox relay: {e}"));
        for chunk in rows.chunks(crate::bus::events::PUBLISH_CHUNK) {
            let mut acks = FuturesOrdered::new();
            for row in chunk {
                let ack = self
                    .js
                    .send_publish(row.subject.clone(), message(row))
                    .await
                    .map_err(|e| refused(e.to_string()))?;
                acks.push_back(ack.into_future());
            }
            while let Some(ack) = acks.next().await {
                ack.map_err(|e| refused(e.to_string()))?;
            }
        }
        Ok(())
    }
}

fn message(row: &OutboxRow) -> PublishMessage {
    PublishMessage::build()
        .payload(row.payload.clone().into())
        .message_id(row.msg_id.clone())
}

/// What the publisher hands the ack waiter: a batch's size, then each message's ack (or the
/// news that a message could not be sent).
enum Pending {
    Batch { seq: i64, messages: usize },
    Ack(i64, jetstream::context::PublishAckFuture),
    NotSent(i64),
}

/// Sends every committed batch's messages in the order they were committed; hands the acks
/// on. When the process stops, what is queued is still sent (what is not waits in the table).
async fn publish_loop(
    js: jetstream::Context,
    mut rx: mpsc::UnboundedReceiver<(i64, Vec<OutboxRow>)>,
    pending: mpsc::Sender<Pending>,
    stop: CancellationToken,
) {
    loop {
        let (seq, rows) = tokio::select! {
            batch = rx.recv() => match batch { Some(b) => b, None => break },
            () = stop.cancelled() => {
                rx.close();
                match rx.recv().await { Some(b) => b, None => break }
            }
        };
        let batch = Pending::Batch {
            seq,
            messages: rows.len(),
        };
        if pending.send(batch).await.is_err() {
            return;
        }
        for row in rows {
            let next = match js.send_publish(row.subject.clone(), message(&row)).await {
                Ok(ack) => Pending::Ack(seq, ack),
                // Left in the table: the leader's relay publishes the batch again.
                Err(e) => {
                    tracing::warn!(subject = %row.subject, error = %e, "outbox publish failed; the relay retries");
                    Pending::NotSent(seq)
                }
            };
            if pending.send(next).await.is_err() {
                return;
            }
        }
    }
}

/// Waits for acks, many at a time, and passes on the batches JetStream stored whole.
async fn ack_loop(mut pending: mpsc::Receiver<Pending>, acked: mpsc::UnboundedSender<i64>) {
    // Messages not yet acked, and whether all so far were stored, of each batch.
    let mut left: HashMap<i64, (usize, bool)> = HashMap::new();
    let settle = |left: &mut HashMap<i64, (usize, bool)>, seq: i64, stored: bool| {
        let Some(entry) = left.get_mut(&seq) else {
            return;
        };
        entry.0 = entry.0.saturating_sub(1);
        entry.1 &= stored;
        if entry.0 == 0 && left.remove(&seq).is_some_and(|(_, all)| all) {
            let _ = acked.send(seq);
        }
    };
    let mut waiting = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            next = pending.recv() => match next {
                Some(Pending::Batch { seq, messages }) => { left.insert(seq, (messages, true)); }
                Some(Pending::Ack(seq, ack)) => waiting.push(async move { (seq, ack.await) }),
                Some(Pending::NotSent(seq)) => settle(&mut left, seq, false),
                None => break,
            },
            Some((seq, result)) = waiting.next(), if !waiting.is_empty() => {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "outbox message not stored; the relay retries");
                }
                settle(&mut left, seq, result.is_ok());
            }
        }
    }
    while let Some((seq, result)) = waiting.next().await {
        settle(&mut left, seq, result.is_ok());
    }
}

/// Deletes stored batches, many at a time.
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
