//! An agent's inbox: the durable consumer `inbox-<agent_id>` on `<ns>_inbox` delivers, in
//! order, every message and handoff offer sent to the agent — including those sent while its
//! worker was down. Each item is appended as one JSON line to `<worker_inbox_dir>/<name>.jsonl`
//! (when set) and logged, then acknowledged.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::bus::names::STREAM_INBOX;
use crate::bus::{BusError, Names, TypedConsumer};
use crate::domain::AgentId;
use crate::protocol::collaboration::InboxItem;

pub async fn run(
    js: jetstream::Context,
    names: Names,
    agent_id: AgentId,
    agent_name: String,
    dir: Option<PathBuf>,
    stop: CancellationToken,
) -> Result<(), BusError> {
    let stream_name = names.stream(STREAM_INBOX);
    let err = |e: String| BusError::Consumer {
        stream: stream_name.clone(),
        reason: e,
    };
    let consumer =
        crate::bus::consume::bind(&js, &stream_name, &names.inbox_consumer(agent_id)).await?;
    let messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
    let mut inbox: TypedConsumer<InboxItem> =
        TypedConsumer::new(messages, js.clone(), names.clone());
    let file = dir.map(|d| d.join(format!("{agent_name}.jsonl")));
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            n = inbox.next() => n,
        };
        let Some(next) = next else { break };
        let delivery = match next {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "inbox consumer error");
                continue;
            }
        };
        match &delivery.value {
            InboxItem::Message(m) => {
                tracing::info!(agent = %agent_name, thread = %m.thread_id, from = %m.sender_id, "message received")
            }
            InboxItem::HandoffOffer(h) => {
                tracing::info!(agent = %agent_name, handoff = %h.handoff_id, task = %h.task_id, "handoff offered")
            }
        }
        if let Some(path) = &file {
            let line = serde_json::to_string(&delivery.value).unwrap_or_default();
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "cannot write inbox item; will retry");
                let _ = delivery.nak(Some(Duration::from_secs(1))).await;
                continue;
            }
        }
        let _ = delivery.ack().await;
    }
    Ok(())
}
