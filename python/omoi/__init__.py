"""omoi: the Python SDK of the omoi agent fleet coordinator.

Everything goes over NATS (docs/protocol.md): :class:`AgentRegistryClient` registers and
finds agents, :class:`Agent` runs tasks as one agent of the fleet, :class:`WorkflowClient`
submits and follows workflows.
"""

from .agent import Agent, HandOff, InboxItem, Resource, Task
from .errors import (
    BadReplyError,
    ConflictError,
    DeregisteredError,
    ForbiddenError,
    InternalError,
    LockError,
    MalformedError,
    NoResponderError,
    NotFoundError,
    OmoiError,
    RequestTimeoutError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnknownAgentError,
    ValidationError,
)
from .locks import LockManager, lock_key, lock_name
from .names import Names, agent_id
from .registry import AgentRegistryClient
from .workflows import TERMINAL_STATUSES, WorkflowClient

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRegistryClient",
    "WorkflowClient",
    "Task",
    "Resource",
    "HandOff",
    "InboxItem",
    "LockManager",
    "Names",
    "agent_id",
    "lock_key",
    "lock_name",
    "TERMINAL_STATUSES",
    "OmoiError",
    "ValidationError",
    "MalformedError",
    "UnauthorizedError",
    "ForbiddenError",
    "NotFoundError",
    "UnknownAgentError",
    "ConflictError",
    "DeregisteredError",
    "TooLargeError",
    "InternalError",
    "UnavailableError",
    "NoResponderError",
    "RequestTimeoutError",
    "BadReplyError",
    "LockError",
]
