//! The typed event bus on a real JetStream: round trips, de-duplication, dead letters.

use std::time::Duration;

use futures::StreamExt;
use omoi::bus::events::Subscription;
use omoi::bus::names::{
    HEADER_DEADLETTER_REASON, HEADER_ORIGINAL_SUBJECT, STREAM_DEADLETTER, STREAM_EVENTS,
};
use omoi::domain::*;
use omoi::protocol::events::*;

use crate::env::TestEnv;

fn one_of_each() -> Vec<Event> {
    let task = TaskEvent {
        task_id: TaskId::new(),
        workflow_id: WorkflowId::new(),
        key: "build".into(),
        status: TaskStatus::Completed,
        attempt: 2,
        agent_id: Some(AgentId::new()),
        error: None,
        retry_at: None,
        lock_wait_ms: None,
    };
    let wf = WorkflowEvent {
        workflow_id: WorkflowId::new(),
        name: "release".into(),
        status: WorkflowStatus::Completed,
    };
    let agent = AgentId::new();
    let node = CoordinationEvent {
        workflow_id: WorkflowId::new(),
        task_id: TaskId::new(),
        key: "gate".into(),
        tasks: vec!["a".into(), "b".into()],
        quorum: Some(1),
        ..CoordinationEvent::default()
    };
    let handoff = HandoffEvent {
        handoff_id: uuid::Uuid::now_v7(),
        task_id: TaskId::new(),
        from_agent_id: agent,
        to_agent_id: Some(AgentId::new()),
        capabilities: vec![],
        status: "requested".into(),
        decided_by: None,
        reason: "needs review".into(),
    };
    vec![
        Event::AgentRegistered(AgentRegistered {
            agent_id: agent,
            name: "a1".into(),
            agent_type: "worker".into(),
            capabilities: vec!["python".into()],
            capacity: 3,
        }),
        Event::AgentCapabilityUpdated(AgentCapabilityUpdated {
            agent_id: agent,
            capabilities: vec!["analysis".into(), "python".into()],
            added: vec!["python".into()],
            removed: vec![],
        }),
        Event::AgentStatusChanged(AgentStatusChanged {
            agent_id: agent,
            from: AgentStatus::Idle,
            to: AgentStatus::Stale,
            reason: "missed heartbeats".into(),
        }),
        Event::AgentDeregistered(AgentDeregistered {
            agent_id: agent,
            name: "a1".into(),
        }),
        Event::TaskReady(task.clone()),
        Event::TaskAssigned(task.clone()),
        Event::TaskStarted(task.clone()),
        Event::TaskCompleted(task.clone()),
        Event::TaskRetrying(TaskEvent {
            retry_at: Some(chrono::Utc::now()),
            error: Some("boom".into()),
            ..task.clone()
        }),
        Event::TaskFailed(task.clone()),
        Event::TaskCancelled(task),
        Event::WorkflowCreated(wf.clone()),
        Event::WorkflowCompleted(wf.clone()),
        Event::WorkflowFailed(wf.clone()),
        Event::WorkflowCancelled(wf),
        Event::CollabStarted(CollabStarted {
            thread_id: uuid::Uuid::now_v7(),
            thread_type: "review".into(),
            participants: vec![agent],
            task_id: None,
            workflow_id: None,
        }),
        Event::CollabEnded(CollabEnded {
            thread_id: uuid::Uuid::now_v7(),
            status: "resolved".into(),
            participants: vec![agent],
        }),
        Event::MessageSent(MessageSent {
            message_id: uuid::Uuid::now_v7(),
            thread_id: uuid::Uuid::now_v7(),
            sender_id: agent,
            recipient_id: None,
            recipients: vec![agent],
            message_type: "text".into(),
            content: "hello".into(),
            metadata: serde_json::json!({}),
            created_at: chrono::Utc::now(),
        }),
        Event::HandoffRequested(handoff.clone()),
        Event::HandoffAccepted(handoff.clone()),
        Event::HandoffDeclined(handoff.clone()),
        Event::HandoffExpired(handoff.clone()),
        Event::HandoffCancelled(handoff),
        Event::SyncCreated(node.clone()),
        Event::SyncReady(CoordinationEvent {
            tasks: vec!["a".into()],
            timed_out: true,
            ..node.clone()
        }),
        Event::SplitCreated(node.clone()),
        Event::MergeCompleted(CoordinationEvent {
            strategy: Some("majority".into()),
            result: Some(serde_json::json!("approve")),
            ..node.clone()
        }),
        Event::LoopIteration(CoordinationEvent {
            iteration: Some(2),
            ..node.clone()
        }),
        Event::LoopCompleted(node),
    ]
}

#[tokio::test]
async fn every_event_type_round_trips_on_its_own_subject() {
    let env = TestEnv::new().await;
    let events = one_of_each();
    assert_eq!(
        events.len(),
        Event::TYPES.len(),
        "the sample covers the catalogue"
    );
    let published = env.bus.publish_all(events).await.unwrap();
    let mut sub = env.bus.subscribe(Subscription::default()).await.unwrap();
    for expected in &published {
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        assert_eq!(got.subject, env.names.event(expected.event.kind()));
        assert_eq!(&got.value, expected);
        got.ack().await.unwrap();
    }
}

#[tokio::test]
async fn a_filtered_subscription_sees_only_its_types() {
    let env = TestEnv::new().await;
    env.bus.publish_all(one_of_each()).await.unwrap();
    let mut sub = env
        .bus
        .subscribe(Subscription {
            filter: Some("task.>".into()),
            ..Subscription::default()
        })
        .await
        .unwrap();
    for _ in 0..7 {
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            got.value.event.kind().starts_with("task."),
            "{}",
            got.value.event.kind()
        );
        got.ack().await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_republished_event_is_stored_once() {
    let env = TestEnv::new().await;
    let envelope = Envelope::new(one_of_each().remove(0));
    env.bus.publish_envelope(&envelope).await.unwrap();
    env.bus.publish_envelope(&envelope).await.unwrap();
    env.bus
        .publish_envelope(&Envelope::new(envelope.event.clone()))
        .await
        .unwrap();
    let mut stream = env
        .js
        .get_stream(env.names.stream(STREAM_EVENTS))
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        2,
        "same id once, new id again"
    );
}

#[tokio::test]
async fn malformed_events_are_dead_lettered_and_the_subscriber_keeps_going() {
    let env = TestEnv::new().await;
    let subject = env.names.event("task.completed");
    env.js
        .publish(subject.clone(), "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut future = serde_json::to_value(Envelope::new(one_of_each().remove(7))).unwrap();
    future["v"] = 99.into();
    env.js
        .publish(subject.clone(), serde_json::to_vec(&future).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let good = env.bus.publish(one_of_each().remove(7)).await.unwrap();

    let mut sub = env.bus.subscribe(Subscription::default()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        got.value, good,
        "the valid event after two bad ones arrives"
    );
    got.ack().await.unwrap();

    let dl = env
        .js
        .get_stream(env.names.stream(STREAM_DEADLETTER))
        .await
        .unwrap();
    let consumer = dl
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut msgs = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while let Some(Ok(m)) = msgs.next().await {
        assert_eq!(m.subject.as_str(), env.names.deadletter(&subject));
        let headers = m.headers.clone().unwrap();
        assert_eq!(
            headers.get(HEADER_ORIGINAL_SUBJECT).unwrap().as_str(),
            subject
        );
        reasons.push((
            headers.get(HEADER_DEADLETTER_REASON).unwrap().to_string(),
            m.payload.clone(),
        ));
        m.ack().await.unwrap();
    }
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].0.contains("malformed payload"), "{reasons:?}");
    assert_eq!(reasons[0].1, "{not json", "payload kept as sent");
    assert!(
        reasons[1].0.contains("unsupported event schema version 99"),
        "{reasons:?}"
    );
}
