//! Pure types of omoi — ids, tasks and their state machine, agents, workflows (the events
//! that announce their changes are wire messages: `protocol::events`).
//! No I/O here: the database and the bus translate to and from these types.

pub mod access;
pub mod agent;
pub mod coordination;
pub mod dag;
pub mod ids;
pub mod matching;
pub mod merge;
pub mod ready;
pub mod retry;
pub mod task;
pub mod text;
pub mod workflow;

pub use agent::{AgentStatus, HealthStatus};
pub use ids::{AgentId, TaskId, WorkflowId};
pub use retry::{AfterFailure, RetryPolicy};
pub use task::{IllegalTransition, Priority, TaskStatus};
pub use workflow::WorkflowStatus;
