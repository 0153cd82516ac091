//! Typed JetStream consumption: a [`TypedConsumer`] yields [`Delivery`]s of a Rust type.
//! A payload that does not parse (or fails its check) is dead-lettered — republished on
//! `<ns>.deadletter.<rest of subject>` with the reason in a header — and then terminated, so
//! it is neither lost nor redelivered, and the consumer keeps going.

use std::marker::PhantomData;
use std::time::Duration;

use async_nats::jetstream::message::{AckKind, Acker, PublishMessage};
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::names::{HEADER_DEADLETTER_REASON, HEADER_ORIGINAL_SUBJECT};
use super::{BusError, Names};

/// A validation applied after parsing, given the subject and the value; `Err(reason)`
/// dead-letters the message.
pub type Check<T> = fn(&str, &T) -> Result<(), String>;

/// Yields typed deliveries from a pull consumer; dead-letters what does not parse.
pub struct TypedConsumer<T> {
    messages: pull::Stream,
    js: jetstream::Context,
    names: Names,
    check: Option<Check<T>>,
    _type: PhantomData<fn() -> T>,
}

/// One message, parsed. Settle it with [`Delivery::ack`], [`Delivery::nak`] or
/// [`Delivery::term`]; a delivery dropped unsettled is nak'ed so it is redelivered at once
/// instead of waiting out the ack timeout.
pub struct Delivery<T> {
    pub value: T,
    pub subject: String,
    /// The message as it arrived (what [`Delivery::dead_letter`] keeps).
    pub payload: bytes::Bytes,
    /// 1 on first delivery, then counts redeliveries.
    pub delivered: i64,
    pub stream_sequence: u64,
    acker: Option<Acker>,
    js: jetstream::Context,
    names: Names,
}

impl<T> Delivery<T> {
    /// The effect is durable: never deliver again.
    pub async fn ack(mut self) -> Result<(), BusError> {
        self.settle(AckKind::Ack).await
    }

    /// Could not handle it now: redeliver after `delay` (or at once).
    pub async fn nak(mut self, delay: Option<Duration>) -> Result<(), BusError> {
        self.settle(AckKind::Nak(delay)).await
    }

    /// Will never be handled: stop redelivering.
    pub async fn term(mut self) -> Result<(), BusError> {
        self.settle(AckKind::Term).await
    }

    /// Parsed, but cannot be handled (ever): republish it on the dead-letter subject with
    /// `reason`, then terminate it. If the dead letter cannot be stored, nak it so it is tried
    /// again later — never dropped.
    pub async fn dead_letter(mut self, reason: &str) -> Result<(), BusError> {
        tracing::warn!(subject = %self.subject, %reason, stream_sequence = self.stream_sequence, "dead-lettering message");
        match dead_letter(
            &self.js,
            &self.names,
            &self.subject,
            self.stream_sequence,
            &self.payload,
            reason,
        )
        .await
        {
            Ok(()) => self.settle(AckKind::Term).await,
            Err(e) => {
                tracing::error!(subject = %self.subject, error = %e, "dead-letter publish failed; will retry");
                self.settle(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await?;
                Err(e)
            }
        }
    }

    /// Still working: extend the ack deadline.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Some(a) => a.ack_with(AckKind::Progress).await.map_err(ack_error),
            None => Ok(()),
        }
    }

    async fn settle(&mut self, kind: AckKind) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.ack_with(kind).await.map_err(ack_error),
            None => Ok(()),
        }
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let (Some(acker), Ok(rt)) = (self.acker.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = acker.ack_with(AckKind::Nak(None)).await;
            });
        }
    }
}

fn ack_error(e: async_nats::Error) -> BusError {
    BusError::Consumer {
        stream: "ack".into(),
        reason: e.to_string(),
    }
}

impl<T: DeserializeOwned> TypedConsumer<T> {
    pub fn new(messages: pull::Stream, js: jetstream::Context, names: Names) -> Self {
        Self {
            messages,
            js,
            names,
            check: None,
            _type: PhantomData,
        }
    }

    /// Adds a check run after parsing; a failing message is dead-lettered with its reason.
    pub fn with_check(mut self, check: Check<T>) -> Self {
        self.check = Some(check);
        self
    }

    /// The next well-formed delivery. `None` when the consumer is gone; `Some(Err)` on a
    /// transient error (the caller may keep calling).
    pub async fn next(&mut self) -> Option<Result<Delivery<T>, BusError>> {
        loop {
            let msg = match self.messages.next().await? {
                Ok(m) => m,
                Err(e) => {
                    return Some(Err(BusError::Consumer {
                        stream: "pull".into(),
                        reason: e.to_string(),
                    }));
                }
            };
            let (delivered, stream_sequence) = msg
                .info()
                .map(|i| (i.delivered, i.stream_sequence))
                .unwrap_or((1, 0));
            let subject = msg.subject.to_string();
            let parsed = serde_json::from_slice::<T>(&msg.payload)
                .map_err(|e| format!("malformed payload: {e}"))
                .and_then(|v| match self.check {
                    Some(check) => check(&subject, &v).map(|()| v),
                    None => Ok(v),
                });
            match parsed {
                Ok(value) => {
                    let (message, acker) = msg.split();
                    return Some(Ok(Delivery {
                        value,
                        subject,
                        payload: message.payload,
                        delivered,
                        stream_sequence,
                        acker: Some(acker),
                        js: self.js.clone(),
                        names: self.names.clone(),
                    }));
                }
                Err(reason) => {
                    tracing::warn!(%subject, %reason, stream_sequence, "dead-lettering message");
                    match dead_letter(
                        &self.js,
                        &self.names,
                        &subject,
                        stream_sequence,
                        &msg.payload,
                        &reason,
                    )
                    .await
                    {
                        Ok(()) => {
                            let _ = msg.ack_with(AckKind::Term).await;
                        }
                        Err(e) => {
                            // Not stored anywhere yet: leave it in the stream for a later try.
                            tracing::error!(%subject, error = %e, "dead-letter publish failed; will retry");
                            let _ = msg
                                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                                .await;
                        }
                    }
                }
            }
        }
    }
}

/// Binds to the durable pull consumer `consumer` of `stream`, which the control plane created:
/// this needs only `$JS.API.CONSUMER.INFO.<stream>.<consumer>` (and then `MSG.NEXT` and acks on
/// it), never the right to create or change consumers.
pub async fn bind(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    js.get_consumer_from_stream(consumer, stream)
        .await
        .map_err(|e| BusError::Consumer {
            stream: stream.to_string(),
            reason: format!("bind to {consumer}: {e}"),
        })
}

/// Publishes `payload` to the dead-letter subject for `subject`, with the reason in headers.
pub async fn dead_letter(
    js: &jetstream::Context,
    names: &Names,
    subject: &str,
    stream_sequence: u64,
    payload: &[u8],
    reason: &str,
) -> Result<(), BusError> {
    let target = names.deadletter(subject);
    let clean_reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect();
    let mut publish = PublishMessage::build()
        .payload(bytes::Bytes::copy_from_slice(payload))
        .header(HEADER_DEADLETTER_REASON, clean_reason.as_str())
        .header(HEADER_ORIGINAL_SUBJECT, subject);
    if stream_sequence > 0 {
        // A redelivered bad message is dead-lettered once.
        publish = publish.message_id(format!("dl:{subject}:{stream_sequence}"));
    }
    let ack = js
        .send_publish(target.clone(), publish)
        .await
        .map_err(|e| BusError::Publish {
            subject: target.clone(),
            reason: e.to_string(),
        })?;
    ack.await.map_err(|e| BusError::Publish {
        subject: target,
        reason: e.to_string(),
    })?;
    Ok(())
}
