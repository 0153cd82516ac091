//! The typed event bus: publish [`Event`]s in an [`Envelope`] on `<ns>.<type>`, and subscribe
//! to them as typed deliveries from the `<ns>_events` stream.

use std::future::IntoFuture;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer};
use futures::future::try_join_all;

use super::names::STREAM_EVENTS;
use super::{BusError, Names, TypedConsumer};
use crate::protocol::events::EVENT_SCHEMA_VERSION;
use crate::protocol::{Envelope, Event};

/// Publishes whose acks are awaited together; well below async-nats' in-flight ack limit.
pub const PUBLISH_CHUNK: usize = 512;

/// Publishes and subscribes to omoi events of one namespace.
#[derive(Clone)]
pub struct EventBus {
    js: jetstream::Context,
    names: Names,
}

/// Which events a subscription receives.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// Event type pattern, e.g. `task.>` or `agent.capability.updated`; `None` = all.
    pub filter: Option<String>,
    /// A durable consumer name (survives restarts; one name = one shared cursor).
    pub durable: Option<String>,
    /// Start with events published from now on instead of the whole stream.
    pub only_new: bool,
}

/// Every event published from now on, in the order the `<ns>_events` stream stored them — for
/// live views. An ordered consumer: nothing to ack, and the client recreates it if a message
/// was missed. One stream, whatever the events' subjects, so the events of a workflow arrive
/// in the order their changes were committed (a `workflow.completed` after its last
/// `task.completed`), which separate subscriptions per subject do not promise.
pub async fn tail(
    js: &jetstream::Context,
    names: &Names,
) -> Result<consumer::pull::Ordered, BusError> {
    let stream_name = names.stream(STREAM_EVENTS);
    let err = |reason: String| BusError::Consumer {
        stream: stream_name.clone(),
        reason,
    };
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| err(e.to_string()))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| err(e.to_string()))?;
    consumer.messages().await.map_err(|e| err(e.to_string()))
}

impl EventBus {
    pub fn new(js: jetstream::Context, names: Names) -> Self {
        Self { js, names }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes one event and waits for JetStream to store it.
    pub async fn publish(&self, event: Event) -> Result<Envelope, BusError> {
        let envelope = Envelope::new(event);
        self.publish_envelope(&envelope).await?;
        Ok(envelope)
    }

    /// Publishes an envelope as is (re-publishing the same id is de-duplicated by JetStream).
    pub async fn publish_envelope(&self, envelope: &Envelope) -> Result<(), BusError> {
        let (subject, msg) = self.prepare(envelope)?;
        let ack = self.send(&subject, msg).await?;
        ack.await.map_err(|e| BusError::Publish {
            subject,
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// Publishes many events with their acks pipelined: one round trip, not one per event.
    pub async fn publish_all(&self, events: Vec<Event>) -> Result<Vec<Envelope>, BusError> {
        let envelopes: Vec<Envelope> = events.into_iter().map(Envelope::new).collect();
        // Each unawaited ack holds one of the context's in-flight permits: awaiting them per
        // chunk keeps a huge batch from waiting for permits that only its own acks free.
        for chunk in envelopes.chunks(PUBLISH_CHUNK) {
            let mut acks = Vec::with_capacity(chunk.len());
            for envelope in chunk {
                let (subject, msg) = self.prepare(envelope)?;
                let ack = self.send(&subject, msg).await?;
                acks.push(async move {
                    ack.into_future().await.map_err(|e| BusError::Publish {
                        subject,
                        reason: e.to_string(),
                    })
                });
            }
            try_join_all(acks).await?;
        }
        Ok(envelopes)
    }

    fn prepare(&self, envelope: &Envelope) -> Result<(String, PublishMessage), BusError> {
        let payload = serde_json::to_vec(envelope).map_err(|source| BusError::Encode {
            what: "event",
            source,
        })?;
        let subject = self.names.event(envelope.event.kind());
        let msg = PublishMessage::build()
            .payload(payload.into())
            .message_id(envelope.id.to_string());
        Ok((subject, msg))
    }

    async fn send(
        &self,
        subject: &str,
        msg: PublishMessage,
    ) -> Result<jetstream::context::PublishAckFuture, BusError> {
        self.js
            .send_publish(subject.to_string(), msg)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.to_string(),
                reason: e.to_string(),
            })
    }

    /// Subscribes to events. Malformed events (or an unknown schema version) are dead-lettered.
    pub async fn subscribe(&self, sub: Subscription) -> Result<TypedConsumer<Envelope>, BusError> {
        let stream_name = self.names.stream(STREAM_EVENTS);
        let err = |reason: String| BusError::Consumer {
            stream: stream_name.clone(),
            reason,
        };
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let config = consumer::pull::Config {
            durable_name: sub.durable.clone(),
            filter_subject: sub
                .filter
                .as_deref()
                .map(|f| self.names.event(f))
                .unwrap_or_default(),
            deliver_policy: if sub.only_new {
                consumer::DeliverPolicy::New
            } else {
                consumer::DeliverPolicy::All
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: std::time::Duration::from_secs(30),
            inactive_threshold: if sub.durable.is_some() {
                std::time::Duration::ZERO
            } else {
                std::time::Duration::from_secs(60)
            },
            ..Default::default()
        };
        let consumer = match &sub.durable {
            Some(name) => stream.get_or_create_consumer(name, config).await,
            None => stream.create_consumer(config).await,
        }
        .map_err(|e| err(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
        Ok(
            TypedConsumer::new(messages, self.js.clone(), self.names.clone()).with_check(|_, env| {
                if env.v == EVENT_SCHEMA_VERSION {
                    Ok(())
                } else {
                    Err(format!(
                        "unsupported event schema version {} (this build reads {EVENT_SCHEMA_VERSION})",
                        env.v
                    ))
                }
            }),
        )
    }
}
