"""The agent registry over NATS (service ``omoi-registry``; docs/registry.md)."""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import nats.js.errors

from ._transport import Client, ConnectionLike, request
from .errors import ConflictError, NotFoundError

__all__ = ["AgentRegistryClient", "AgentRecord", "AgentMatch"]

#: An agent record as the control plane sends it: ``id, name, agent_type, phase_id,
#: capabilities, capacity, current_load, status, health_status, last_heartbeat,
#: last_assigned_at, tags, metadata, executors, created_at, updated_at``.
AgentRecord = dict[str, Any]
#: A search result: ``{"agent": AgentRecord, "match_score": float,
#: "matched_capabilities": [...]}``.
AgentMatch = dict[str, Any]


class AgentRegistryClient(Client):
    """Registers, updates and finds agents.

    Every action on an agent is sent as that agent, on ``<ns>.act.<agent_id>.<verb>`` (on a
    NATS server with permissions, the client's credentials decide whom it may act as).
    ``agent`` arguments take an agent id or an agent name (its id is derived:
    :func:`omoi.agent_id`).

    ``nc_or_url`` is a connected ``nats.aio.client.Client`` (borrowed, left open) or a URL
    (connected on first use, closed by :meth:`close`).
    """

    def __init__(
        self,
        nc_or_url: ConnectionLike = "nats://127.0.0.1:4222",
        *,
        namespace: str = "omoi",
        timeout: float = 10.0,
    ) -> None:
        super().__init__(nc_or_url, namespace, timeout, "omoi-py-registry")

    def agent_id(self, agent: str) -> str:
        """The id of ``agent`` (an id, or a name in this namespace)."""
        return self.names.resolve_agent(agent)

    async def _act(self, agent: str, verb: str, body: dict[str, Any]) -> Any:
        nc = await self._conn.nc()
        return await request(nc, self.names.act(self.agent_id(agent), verb), body, self.timeout)

    async def register(
        self,
        name: str,
        capabilities: Iterable[str] = (),
        *,
        capacity: int = 1,
        agent_type: str = "worker",
        tags: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        phase_id: str | None = None,
        executors: Iterable[str] | None = None,
        instance: str | None = None,
    ) -> AgentRecord:
        """Registers agent ``name`` (or takes over its name from a stale or offline agent:
        same id). ``executors``: the executor names it runs; ``None`` offers any (``*``).
        ``instance`` names the registering process: the same instance registering again while
        its agent is live is answered with the agent (a lost reply can be retried).
        Raises :class:`~omoi.errors.ConflictError` when a live agent holds the name,
        :class:`~omoi.errors.ValidationError` for a bad field. The reply comes once the
        agent's dispatch and inbox consumers exist."""
        body: dict[str, Any] = {
            "v": 1,
            "name": name,
            "agent_type": agent_type,
            "capabilities": list(capabilities),
            "capacity": capacity,
            "tags": list(tags),
        }
        if metadata is not None:
            body["metadata"] = metadata
        if phase_id is not None:
            body["phase_id"] = phase_id
        if executors is not None:
            body["executors"] = list(executors)
        if instance is not None:
            body["instance"] = instance
        nc = await self._conn.nc()
        return await request(nc, self.names.act(self.names.agent_id(name), "register"), body, self.timeout)  # type: ignore[no-any-return]

    async def update(
        self,
        agent: str,
        *,
        capabilities: Iterable[str] | None = None,
        capacity: int | None = None,
        status: str | None = None,
        tags: Iterable[str] | None = None,
        metadata: dict[str, Any] | None = None,
        executors: Iterable[str] | None = None,
    ) -> AgentRecord:
        """Changes the fields given (a partial update), acting as the agent; the agent record
        comes back. An agent sets its own ``status`` only to ``maintenance`` or ``idle``, and
        not out of ``quarantined`` (:class:`~omoi.errors.ForbiddenError`; an operator does the
        rest over HTTP); a change the transition table of docs/registry.md does not allow is
        :class:`~omoi.errors.ConflictError`."""
        body: dict[str, Any] = {}
        if capabilities is not None:
            body["capabilities"] = list(capabilities)
        if capacity is not None:
            body["capacity"] = capacity
        if status is not None:
            body["status"] = status
        if tags is not None:
            body["tags"] = list(tags)
        if metadata is not None:
            body["metadata"] = metadata
        if executors is not None:
            body["executors"] = list(executors)
        return await self._act(agent, "update", body)  # type: ignore[no-any-return]

    async def set_availability(self, agent: str, available: bool) -> AgentRecord:
        """Takes an agent out of rotation (``available=False``: ``maintenance``) or puts it
        back (``True``: ``idle``), as ``POST /agents/{id}/availability`` does: putting back an
        agent that is already available, or taking out one already in maintenance, changes
        nothing; a stale or offline agent becomes available only by heartbeating again
        (:class:`~omoi.errors.ConflictError`), a quarantined one only by an operator
        (:class:`~omoi.errors.ForbiddenError`); an unknown or deregistered one is
        :class:`~omoi.errors.NotFoundError`. Reads the status from the ``<ns>_agents`` mirror,
        then changes it with ``update``."""
        current = await self.get(agent)
        if current is None:
            raise NotFoundError(message=f"agent {self.agent_id(agent)} not found")
        status = current.get("status")
        if available:
            if status in ("idle", "running", "degraded"):
                return current
            if status not in ("maintenance", "quarantined"):  # quarantined: the server refuses
                raise ConflictError(
                    message=f"agent {current.get('id')} is {status}; it becomes available when it heartbeats again"
                )
            return await self.update(agent, status="idle")
        if status == "maintenance":
            return current
        return await self.update(agent, status="maintenance")

    async def available(self, agent: str) -> AgentRecord:
        """``set_availability(agent, True)``."""
        return await self.set_availability(agent, True)

    async def unavailable(self, agent: str) -> AgentRecord:
        """``set_availability(agent, False)``."""
        return await self.set_availability(agent, False)

    async def heartbeat(self, agent: str, load: int = 0, *, leaving: bool = False) -> dict[str, Any]:
        """One heartbeat for ``agent`` with its ``load``; ``leaving=True`` marks it offline at
        once. Reply ``{agent_id, status}``; :class:`~omoi.errors.UnknownAgentError` if it is not
        registered, :class:`~omoi.errors.DeregisteredError` if it was deregistered."""
        aid = self.agent_id(agent)
        body: dict[str, Any] = {"v": 1, "agent_id": aid, "load": load}
        if leaving:
            body["leaving"] = True
        return await self._act(aid, "heartbeat", body)  # type: ignore[no-any-return]

    async def deregister(self, agent: str) -> AgentRecord:
        """Deregisters ``agent``, acting as it (``<ns>.act.<id>.deregister``): it becomes
        ``terminated``, its name is freed and its consumers deleted. The record comes back."""
        return await self._act(agent, "deregister", {"v": 1})  # type: ignore[no-any-return]

    @staticmethod
    def _query(
        capabilities: Iterable[str],
        partial: bool,
        limit: int | None,
        preferred_tags: Iterable[str],
        agent_type: str | None,
        phase_id: str | None,
        executor: str | None,
    ) -> dict[str, Any]:
        q: dict[str, Any] = {
            "capabilities": list(capabilities),
            "partial": partial,
            "preferred_tags": list(preferred_tags),
        }
        if limit is not None:
            q["limit"] = limit
        if agent_type is not None:
            q["agent_type"] = agent_type
        if phase_id is not None:
            q["phase_id"] = phase_id
        if executor is not None:
            q["executor"] = executor
        return q

    async def search(
        self,
        capabilities: Iterable[str] = (),
        *,
        partial: bool = False,
        limit: int | None = None,
        preferred_tags: Iterable[str] = (),
        agent_type: str | None = None,
        phase_id: str | None = None,
        executor: str | None = None,
    ) -> list[AgentMatch]:
        """Live agents that can take work and have every capability (``partial``: at least
        one), best first: ``[{"agent", "match_score", "matched_capabilities"}]``."""
        nc = await self._conn.nc()
        q = self._query(capabilities, partial, limit, preferred_tags, agent_type, phase_id, executor)
        return await request(nc, self.names.registry("search"), q, self.timeout)  # type: ignore[no-any-return]

    async def best_fit(
        self,
        capabilities: Iterable[str] = (),
        *,
        preferred_tags: Iterable[str] = (),
        agent_type: str | None = None,
        phase_id: str | None = None,
        executor: str | None = None,
    ) -> AgentMatch:
        """The best candidate (never a partial match); :class:`~omoi.errors.NotFoundError`
        when none can take work."""
        nc = await self._conn.nc()
        q = self._query(capabilities, False, None, preferred_tags, agent_type, phase_id, executor)
        return await request(nc, self.names.registry("best_fit"), q, self.timeout)  # type: ignore[no-any-return]

    async def get(self, agent: str) -> AgentRecord | None:
        """The agent's record from the ``<ns>_agents`` KV mirror; ``None`` if it is not
        registered (deregistered agents are deleted from the mirror)."""
        js = await self._conn.js()
        kv = await js.key_value(self.names.bucket("agents"))
        try:
            entry = await kv.get(self.agent_id(agent))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        record: AgentRecord = json.loads(entry.value)
        return record

    async def list(self) -> Sequence[AgentRecord]:
        """Every record in the ``<ns>_agents`` mirror (registered agents, any status but
        terminated)."""
        js = await self._conn.js()
        kv = await js.key_value(self.names.bucket("agents"))
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        out: list[AgentRecord] = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                out.append(json.loads(entry.value))
        return out
