"""Subject, stream and bucket names of one namespace (docs/protocol.md; src/bus/names.rs),
and agent ids."""

from __future__ import annotations

import re
import uuid

__all__ = ["AGENT_ID_NAMESPACE", "agent_id", "Names", "validate_namespace"]

#: ``uuid5(uuid5(NAMESPACE_URL, "urn:omoi:agent"), ...)``: agent ids derive from it.
AGENT_ID_NAMESPACE = uuid.UUID("d7a75749-d525-55b6-af74-48ecdea8f6e7")

_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def validate_namespace(namespace: str) -> str:
    """Returns ``namespace`` if it is valid (``[a-z][a-z0-9_-]{0,31}``), else raises
    ``ValueError``."""
    if not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"namespace {namespace!r} must match [a-z][a-z0-9_-]{{0,31}}"
        )
    return namespace


def agent_id(namespace: str, name: str) -> str:
    """The id of agent ``name`` in ``namespace``, the same in every language:
    ``uuid5(d7a75749-d525-55b6-af74-48ecdea8f6e7, "<ns>/<name>")``."""
    return str(uuid.uuid5(AGENT_ID_NAMESPACE, f"{namespace}/{name}"))


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


class Names:
    """Every name of one namespace."""

    def __init__(self, namespace: str = "omoi") -> None:
        self.ns = validate_namespace(namespace)

    def __repr__(self) -> str:
        return f"Names({self.ns!r})"

    def agent_id(self, name: str) -> str:
        return agent_id(self.ns, name)

    def resolve_agent(self, agent: str) -> str:
        """An agent id given an id or a name."""
        return agent if is_uuid(agent) else self.agent_id(agent)

    # Streams, buckets, object stores.
    def stream(self, key: str) -> str:
        return f"{self.ns}_{key}"

    bucket = stream

    # Subjects.
    def event(self, kind: str) -> str:
        return f"{self.ns}.{kind}"

    def act(self, agent: str, verb: str) -> str:
        return f"{self.ns}.act.{agent}.{verb}"

    def registry(self, verb: str) -> str:
        return f"{self.ns}.registry.{verb}"

    def workflow(self, verb: str) -> str:
        return f"{self.ns}.workflow.{verb}"

    def dispatch(self, agent: str) -> str:
        return f"{self.ns}.dispatch.{agent}"

    def result(self, agent: str, task_id: str) -> str:
        return f"{self.ns}.result.{agent}.{task_id}"

    def inbox(self, agent: str) -> str:
        return f"{self.ns}.agent.inbox.{agent}"

    def deadletter(self, original: str) -> str:
        prefix = f"{self.ns}."
        rest = original[len(prefix):] if original.startswith(prefix) else original
        return f"{self.ns}.deadletter.{rest}"

    # Consumers.
    @staticmethod
    def dispatch_consumer(agent: str) -> str:
        return f"agent-{agent}"

    @staticmethod
    def inbox_consumer(agent: str) -> str:
        return f"inbox-{agent}"
