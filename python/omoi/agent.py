"""An agent written in Python: registers, heartbeats, runs a handler for each dispatch (docs/
protocol.md "Running tasks"), takes its resource locks, reads its inbox and collaborates.

It follows the contract ``omoi worker`` follows (src/worker/runner.rs), so Python agents and
``omoi worker`` processes share a fleet, its locks and its handoffs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import signal
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Optional

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ._transport import MSG_ID_HEADER, Connection, ConnectionLike, dead_letter, dumps, request
from .errors import (
    ConflictError,
    DeregisteredError,
    LockError,
    OmoiError,
    UnknownAgentError,
)
from .locks import Blocked, HeldLock, LockManager, LockMode
from .names import Names, is_uuid

__all__ = ["Agent", "Task", "Resource", "HandOff", "InboxItem", "Handler", "InboxHandler"]

log = logging.getLogger("omoi.agent")

#: Largest report published (nats-server's default max_payload is 1 MiB).
MAX_REPORT_BYTES = 1_000_000
#: An attempt still going after this long reports ``started``; one that ends sooner reports
#: only its end.
STARTED_AFTER = 0.020
#: How long a report that is not stored is sent again before the dispatch is given back.
REPORT_RETRY_FOR = 15.0
#: The dispatch consumer's ack wait (set by the control plane): extended every third of it.
DISPATCH_ACK_WAIT = 30.0
#: Finished attempts remembered, so a redelivered dispatch of one is acked, not rerun.
FINISHED_KEPT = 4096


@dataclass(frozen=True)
class Resource:
    """A resource a task locks: ``name``, ``mode`` ``exclusive`` or ``shared``."""

    name: str
    mode: LockMode = "exclusive"


@dataclass
class Task:
    """One dispatch: an attempt at a task, handed to this agent.

    ``lock_tokens`` maps each resource the SDK locked for it to its fencing token (the KV
    revision of the granting write; it only grows from one holder to the next): pass it to
    whatever the task writes so a store can refuse a holder that lost its lock.
    ``input["handoff"]`` (also :attr:`handoff`) is set when the task reached this agent by an
    accepted handoff."""

    task_id: str
    workflow_id: str
    key: str
    attempt: int
    agent_id: str
    executor: str
    input: Any
    dependencies: dict[str, Any]
    resources: list[Resource]
    timeout_seconds: Optional[int]
    lock_tokens: dict[str, int] = field(default_factory=dict)
    dependencies_omitted: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def handoff(self) -> Optional[dict[str, Any]]:
        """``{id, from_agent_id, reason, context}`` when this task was handed over to this
        agent, else ``None``."""
        if isinstance(self.input, dict) and isinstance(self.input.get("handoff"), dict):
            return self.input["handoff"]  # type: ignore[no-any-return]
        return None


class HandOff(Exception):
    """Return or raise it from a handler to hand the running task to another agent: to
    ``to_agent_id`` (or the agent named ``to_agent``), or to the best-fit agents with every
    one of ``capabilities`` (an open handoff). The SDK requests it with ``release: true`` and
    the attempt, as ``omoi worker`` does for a shell command exiting 75: the task waits for
    the decision; accepted, it is dispatched to the acceptor with ``input.handoff``; declined
    or expired, it goes to the next best fit."""

    def __init__(
        self,
        *,
        capabilities: Iterable[str] = (),
        to_agent_id: Optional[str] = None,
        to_agent: Optional[str] = None,
        reason: str = "",
        context: Any = None,
        on_decline: str = "reschedule",
        ttl_seconds: Optional[int] = None,
    ) -> None:
        self.capabilities = list(capabilities)
        self.to_agent_id = to_agent_id
        self.to_agent = to_agent
        self.reason = reason
        self.context = context
        self.on_decline = on_decline
        self.ttl_seconds = ttl_seconds
        super().__init__(f"asks for a handoff: {reason}")


class InboxItem:
    """One item of the agent's inbox: ``kind`` ``message`` or ``handoff_offer``, and its
    fields (``data``; also by attribute: ``item.content``, ``item.handoff_id`` …)."""

    def __init__(self, data: dict[str, Any], msg: Optional[Msg]) -> None:
        self.data = data
        self.kind: str = str(data.get("kind", ""))
        self._msg = msg
        self.settled = False

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"InboxItem({self.data!r})"

    async def ack(self) -> None:
        """Done with it: it is not delivered again (the next item comes)."""
        if not self.settled and self._msg is not None:
            self.settled = True
            await self._msg.ack()

    async def nak(self, delay: Optional[float] = None) -> None:
        """Not handled: deliver it again (after ``delay`` seconds)."""
        if not self.settled and self._msg is not None:
            self.settled = True
            await self._msg.nak(delay=delay)


Handler = Callable[[Task], Awaitable[Any]]
InboxHandler = Callable[[InboxItem], Awaitable[Any]]


@dataclass
class _Running:
    attempt: int
    cancelled: asyncio.Event
    reason: str = ""


@dataclass
class _Ending:
    """How an attempt ended: a report to send, or a handoff to request."""

    outcome: Optional[dict[str, Any]] = None
    handoff: Optional[HandOff] = None


def _find_nul(value: Any, path: str = "$") -> Optional[str]:
    """The JSON path of a U+0000 in ``value`` (which PostgreSQL cannot store), as omoi names
    it."""
    if isinstance(value, str):
        return path if "\0" in value else None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_nul(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            key = str(k)
            shown = key.replace("\0", "\\u0000")
            sub = f"{path}.{shown}"
            if "\0" in key:
                return sub
            found = _find_nul(v, sub)
            if found:
                return found
    return None


def _scrub(text: str) -> str:
    return text.replace("\0", "\ufffd")


class _Started:
    """The ``started`` report of an attempt, sent by a timer unless the attempt ends first."""

    def __init__(self, agent: "Agent", task_id: str, attempt: int) -> None:
        self.began = time.monotonic()
        self.fired = False
        self._agent = agent
        self._task_id = task_id
        self._attempt = attempt
        self._timer = asyncio.create_task(self._fire())

    async def _fire(self) -> None:
        await asyncio.sleep(STARTED_AFTER)
        self.fired = True
        running_ms = int((time.monotonic() - self.began) * 1000)
        await self._agent._report(
            self._task_id, self._attempt, {"outcome": "started", "running_ms": running_ms}
        )

    async def settle(self) -> None:
        """Stops the timer if it has not fired, or waits until ``started`` is stored if it
        has (so it reaches the scheduler before what follows). Raises if that report
        failed."""
        if not self.fired:
            self._timer.cancel()
        # asyncio.wait neither raises the timer's error nor swallows our own cancellation.
        await asyncio.wait([self._timer])
        if self.fired and not self._timer.cancelled() and self._timer.exception() is not None:
            raise self._timer.exception()  # type: ignore[misc]


class Agent:
    """A Python agent.

    ::

        agent = Agent("nats://127.0.0.1:4222", name="summarizer", capabilities=["summarize"],
                      capacity=2)

        @agent.handler
        async def handle(task: Task) -> dict:
            return {"summary": task.input["text"][:100]}

        await agent.run()      # until SIGINT/SIGTERM or agent.stop()

    ``executors``: the executor names it runs (a task goes only to an agent offering its
    executor); ``None`` offers any (``*``). ``heartbeat_interval``: seconds between
    heartbeats (the control plane marks an agent stale after 3 s of silence). ``lock_wait``:
    how long a dispatch waits for busy resource locks before it is handed back ``blocked``;
    ``lock_lease``: a lock's lease (renewed every third of it). ``shutdown_grace``: how long
    running handlers get to finish when stopping; those still running then are cancelled and
    reported ``released``. ``default_timeout``: the longest a task that sets no
    ``timeout_seconds`` runs. ``on_inbox``: a callback run for each inbox item (acked after it
    returns); without one, read the inbox with :meth:`inbox`.
    """

    def __init__(
        self,
        nc_or_url: ConnectionLike = "nats://127.0.0.1:4222",
        *,
        name: str,
        capabilities: Iterable[str] = (),
        capacity: int = 1,
        namespace: str = "omoi",
        executors: Optional[Iterable[str]] = None,
        handler: Optional[Handler] = None,
        agent_type: str = "worker",
        tags: Iterable[str] = (),
        metadata: Optional[dict[str, Any]] = None,
        phase_id: Optional[str] = None,
        heartbeat_interval: float = 1.0,
        lock_wait: float = 10.0,
        lock_lease: float = 15.0,
        shutdown_grace: float = 10.0,
        default_timeout: float = 3600.0,
        request_timeout: float = 10.0,
        register_timeout: float = 30.0,
        on_inbox: Optional[InboxHandler] = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.names = Names(namespace)
        self.name = name
        self.id = self.names.agent_id(name)
        self.capabilities = list(capabilities)
        self.capacity = capacity
        self.executors = None if executors is None else list(executors)
        self.agent_type = agent_type
        self.tags = list(tags)
        self.metadata = metadata
        self.phase_id = phase_id
        self.heartbeat_interval = heartbeat_interval
        self.lock_wait = lock_wait
        self.lock_lease = lock_lease
        self.shutdown_grace = shutdown_grace
        self.default_timeout = default_timeout
        self.request_timeout = request_timeout
        self.register_timeout = register_timeout
        self._handler = handler
        self._on_inbox = on_inbox
        self._conn = Connection(nc_or_url, f"omoi-py-agent-{name}")
        self.record: Optional[dict[str, Any]] = None
        self.locks: Optional[LockManager] = None
        self.deregistered = False
        # Names this process to the registry: a registration sent again after a lost reply
        # is answered with the agent, not refused as a name held by someone else.
        self.instance = f"omoi-py-{uuid.uuid4().hex}"
        self._running: dict[str, _Running] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._stop = asyncio.Event()
        self._hard = asyncio.Event()
        self._done = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._heartbeats_done = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._psub: Any = None
        self._started = False
        self._closed = False
        self._starting: Optional[asyncio.Lock] = None

    # ---------------------------------------------------------------- configuration

    def handler(self, fn: Handler) -> Handler:
        """Decorator: ``fn(task)`` runs each dispatch. Return its output (JSON), return or
        raise :class:`HandOff` to hand the task over; raise to fail the attempt."""
        self._handler = fn
        return fn

    def inbox_handler(self, fn: InboxHandler) -> InboxHandler:
        """Decorator: ``fn(item)`` runs for each inbox item while the agent runs; the item is
        acked after it returns (an exception naks it: it comes again)."""
        self._on_inbox = fn
        return fn

    @property
    def load(self) -> int:
        """Dispatches held now (what heartbeats report)."""
        return len(self._running)

    @property
    def running_tasks(self) -> dict[str, int]:
        """Task id → attempt of the dispatches held now."""
        return {t: r.attempt for t, r in self._running.items()}

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def agent_id_of(self, agent: str) -> str:
        """The id of an agent given its id or its name (in this namespace)."""
        return self.names.resolve_agent(agent)

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> "Agent":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.wait_closed()

    async def start(self) -> dict[str, Any]:
        """Connects, registers, and starts heartbeating, pulling dispatches (and consuming
        the inbox when an ``on_inbox`` callback is set). Returns the agent record."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._started:
                assert self.record is not None
                return self.record
            if self._handler is None:
                raise ValueError("the agent has no handler: pass handler= or use @agent.handler")
            nc = await self._conn.nc()
            js = await self._conn.js()
            self.locks = LockManager(await self._wait_for_locks(js), self.lock_lease)
            self.record = await self._register_until_accepted()
            for kind in ("task.cancelled", "task.ready"):
                self._subs.append(await nc.subscribe(self.names.event(kind), cb=self._on_task_event))
            self._psub = await self._bind(
                js, self.names.stream("dispatch"), self.names.dispatch_consumer(self.id)
            )
            self._started = True
            self._loops.append(asyncio.create_task(self._heartbeat_loop(), name=f"omoi-heartbeat-{self.name}"))
            self._loops.append(asyncio.create_task(self._pull_loop(), name=f"omoi-pull-{self.name}"))
            if self._on_inbox is not None:
                self._loops.append(asyncio.create_task(self._inbox_loop(), name=f"omoi-inbox-{self.name}"))
            self._main = asyncio.create_task(self._lifecycle(), name=f"omoi-agent-{self.name}")
            log.info("agent %s (%s) registered", self.name, self.id)
            return self.record

    async def run(self, *, handle_signals: bool = True) -> None:
        """Runs the agent until SIGINT/SIGTERM (when ``handle_signals``, in the main
        thread), :meth:`stop`, or its deregistration; then shuts down cleanly: no new
        dispatches, running handlers get ``shutdown_grace`` to finish, the rest are cancelled
        and reported ``released``, locks released, a ``leaving`` heartbeat, the connection
        closed (if the agent opened it)."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        try:
            await self.start()
            await self.wait_closed()
        finally:
            for sig in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Asks the agent to stop (returns at once; :meth:`wait_closed` waits for the end)."""
        self._stop.set()
        self._slot_freed.set()

    async def wait_closed(self) -> None:
        """Waits until the agent has shut down."""
        if not self._started:
            await self._conn.close()
            return
        await asyncio.shield(self._main)

    async def _lifecycle(self) -> None:
        await self._stop.wait()
        try:
            await self._shutdown()
        finally:
            self._done.set()

    async def _shutdown(self) -> None:
        log.info("agent %s stopping: no new tasks; waiting for running ones", self.name)
        pull = self._loops[1] if len(self._loops) > 1 else None
        if pull is not None:
            with contextlib.suppress(BaseException):
                await pull
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=self.shutdown_grace)
            if pending:
                log.warning("grace period over: handing back %d running task(s)", len(pending))
                self._hard.set()
                await asyncio.wait(pending, timeout=10.0)
        # The heartbeat loop finishes the heartbeat it may be sending (never cancelled
        # mid-request): a heartbeat that reached the control plane after — or in the same
        # batch as — the `leaving` one below would mark the agent live again.
        self._heartbeats_done.set()
        heartbeat = self._loops[0]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(heartbeat), self.request_timeout + 1)
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(BaseException):
                await t
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
        if not self.deregistered:
            try:
                nc = await self._conn.nc()
                await request(
                    nc,
                    self.names.act(self.id, "heartbeat"),
                    {"v": 1, "agent_id": self.id, "load": 0, "leaving": True},
                    min(self.request_timeout, 5.0),
                )
            except Exception as e:  # noqa: BLE001
                log.debug("could not announce leaving: %s", e)
        with contextlib.suppress(Exception):
            nc = await self._conn.nc()
            await nc.flush(timeout=2)
        await self._conn.close()
        self._closed = True
        log.info("agent %s stopped", self.name)

    async def _wait_for_locks(self, js: JetStreamContext) -> Any:
        """The ``<ns>_locks`` bucket, waiting until a control plane provisioned it."""
        delay = 0.2
        while True:
            try:
                return await js.key_value(self.names.bucket("locks"))
            except Exception as e:  # noqa: BLE001
                if self._stop.is_set():
                    raise
                log.warning("lock bucket not there yet (%s); waiting", e)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)

    async def _bind(self, js: JetStreamContext, stream: str, consumer: str) -> Any:
        """Binds to a durable pull consumer the control plane created (``CONSUMER.INFO``,
        then pulls); never creates one."""
        await js.consumer_info(stream, consumer)
        return await js.pull_subscribe_bind(durable=consumer, stream=stream)

    def _registration(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": 1,
            "name": self.name,
            "agent_type": self.agent_type,
            "capabilities": self.capabilities,
            "capacity": self.capacity,
            "tags": self.tags,
            "instance": self.instance,
        }
        if self.metadata is not None:
            body["metadata"] = self.metadata
        if self.phase_id is not None:
            body["phase_id"] = self.phase_id
        if self.executors is not None:
            body["executors"] = self.executors
        return body

    async def _register_until_accepted(self) -> dict[str, Any]:
        """Registers, retrying while no control plane answers or the name is still held by a
        previous incarnation (not yet stale) — up to ``register_timeout``."""
        deadline = time.monotonic() + self.register_timeout
        delay = 0.2
        while True:
            nc = await self._conn.nc()
            try:
                record: dict[str, Any] = await request(
                    nc, self.names.act(self.id, "register"), self._registration(), self.request_timeout
                )
                return record
            except ConflictError:
                if time.monotonic() >= deadline:
                    raise
                log.info("name %s still held; retrying", self.name)
            except OmoiError as e:
                if e.status is not None and e.code not in ("unavailable", "internal"):
                    raise
                if time.monotonic() >= deadline:
                    raise
                log.warning("registration failed (%s); retrying", e)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)

    # ---------------------------------------------------------------- heartbeats

    async def _heartbeat_loop(self) -> None:
        """Heartbeats every ``heartbeat_interval`` with the load, until the shutdown is done
        (it goes on while running tasks drain)."""
        nc = await self._conn.nc()
        first = True
        while True:
            if not first:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._heartbeats_done.wait(), self.heartbeat_interval)
            first = False
            if self._heartbeats_done.is_set():
                return
            try:
                await request(
                    nc,
                    self.names.act(self.id, "heartbeat"),
                    {"v": 1, "agent_id": self.id, "load": min(self.load, 1000)},
                    min(self.request_timeout, 5.0),
                )
            except DeregisteredError:
                log.warning("agent %s was deregistered; stopping", self.name)
                self.deregistered = True
                self.stop()
                return
            except UnknownAgentError:
                log.warning("control plane does not know agent %s; registering again", self.name)
                try:
                    self.record = await self._register_until_accepted()
                except Exception as e:  # noqa: BLE001
                    log.error("re-registration failed: %s", e)
            except Exception as e:  # noqa: BLE001
                log.debug("heartbeat not answered: %s", e)

    # ---------------------------------------------------------------- dispatches

    async def _pull_loop(self) -> None:
        while not self._stop.is_set():
            free = self.capacity - len(self._inflight)
            if free <= 0:
                self._slot_freed.clear()
                if self.capacity - len(self._inflight) <= 0:
                    await self._slot_freed.wait()
                continue
            try:
                msgs = await self._psub.fetch(free, timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                if self._stop.is_set():
                    break
                log.warning("fetch failed (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                t = asyncio.create_task(self._handle(msg))
                self._inflight.add(t)
                t.add_done_callback(self._task_done)

    def _task_done(self, t: "asyncio.Task[None]") -> None:
        self._inflight.discard(t)
        self._slot_freed.set()
        if not t.cancelled() and t.exception() is not None:
            log.error("dispatch handling failed: %r", t.exception())

    async def _on_task_event(self, msg: Msg) -> None:
        """Stops a running task that was cancelled (``task.cancelled``) or put back to ready
        at or after its attempt (``task.ready``: handed off, or reclaimed)."""
        try:
            env = json.loads(msg.data)
            data = env["data"]
            task_id = str(data["task_id"])
            attempt = int(data.get("attempt", 0))
            kind = str(env.get("type") or msg.subject[len(self.names.ns) + 1 :])
        except (ValueError, KeyError, TypeError):
            return
        running = self._running.get(task_id)
        if running is None:
            return
        if kind == "task.cancelled":
            running.reason = "cancelled by its workflow"
            running.cancelled.set()
        elif kind == "task.ready" and attempt >= running.attempt:
            running.reason = "taken back by the scheduler"
            running.cancelled.set()

    def _parse_dispatch(self, msg: Msg) -> dict[str, Any]:
        try:
            d = json.loads(msg.data)
        except ValueError as e:
            raise ValueError(f"malformed dispatch: {e}") from e
        if not isinstance(d, dict):
            raise ValueError("malformed dispatch: not a JSON object")
        v = d.get("v", 1)
        if v != 1 or isinstance(v, bool):
            raise ValueError(f"unsupported protocol version {v} in a dispatch (this agent speaks 1)")
        for f in ("task_id", "workflow_id", "key", "attempt", "agent_id", "executor"):
            if f not in d:
                raise ValueError(f"malformed dispatch: missing field `{f}`")
        if not isinstance(d["attempt"], int) or isinstance(d["attempt"], bool):
            raise ValueError("malformed dispatch: `attempt` is not an integer")
        if d["agent_id"] != self.id or msg.subject != self.names.dispatch(self.id):
            raise ValueError(
                f"dispatch for agent {d['agent_id']} on {msg.subject} reached agent {self.id}"
            )
        return d

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        log.warning("dead-lettering dispatch on %s: %s", msg.subject, reason)
        try:
            seq = msg.metadata.sequence.stream
        except Exception:  # noqa: BLE001
            seq = 0
        try:
            js = await self._conn.js()
            await dead_letter(js, self.names, msg.subject, seq, msg.data, reason)
        except Exception as e:  # noqa: BLE001
            log.error("dead-letter publish failed (%s); will retry", e)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1)
            return
        with contextlib.suppress(Exception):
            await msg.term()

    async def _handle(self, msg: Msg) -> None:
        try:
            d = self._parse_dispatch(msg)
        except ValueError as e:
            await self._dead_letter(msg, str(e))
            return
        task_id, attempt = str(d["task_id"]), int(d["attempt"])
        if (task_id, attempt) in self._finished:
            log.info("redelivered dispatch of finished attempt %s:%d acknowledged, not run", task_id, attempt)
            with contextlib.suppress(Exception):
                await msg.ack()
            return
        if task_id in self._running:
            # A redelivery of what runs here: the running copy acknowledges it.
            return
        running = _Running(attempt, asyncio.Event())
        self._running[task_id] = running
        try:
            stored = await self._execute(msg, d, running)
        finally:
            self._running.pop(task_id, None)
        if stored:
            self._finished[(task_id, attempt)] = None
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
            with contextlib.suppress(Exception):
                await msg.ack()
        else:
            log.warning("could not report on %s; the dispatch will be redelivered", task_id)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1)

    async def _execute(self, msg: Msg, d: dict[str, Any], running: _Running) -> bool:
        """Runs one attempt; whether its end was reported (or its handoff requested)."""
        task_id, attempt = str(d["task_id"]), int(d["attempt"])
        owner = f"{task_id}:{attempt}"
        started = _Started(self, task_id, attempt)
        resources = [
            Resource(str(r["name"]), "shared" if r.get("mode") == "shared" else "exclusive")
            for r in (d.get("resources") or [])
            if isinstance(r, dict) and "name" in r
        ]
        assert self.locks is not None
        locks = self.locks
        held: list[HeldLock] = []
        lock_lost: list[str] = []
        keepalive = asyncio.create_task(self._keepalive(msg, held, owner, running, lock_lost))
        try:
            lock_began = time.monotonic()
            if resources:
                ending = await self._take_locks(resources, owner, running, held)
                if ending is not None:
                    return await self._end(started, task_id, attempt, ending)
            lock_wait_ms = int((time.monotonic() - lock_began) * 1000) if resources else None
            task = Task(
                task_id=task_id,
                workflow_id=str(d["workflow_id"]),
                key=str(d["key"]),
                attempt=attempt,
                agent_id=str(d["agent_id"]),
                executor=str(d["executor"]),
                input=d.get("input"),
                dependencies=dict(d.get("dependencies") or {}),
                resources=resources,
                timeout_seconds=d.get("timeout_seconds"),
                lock_tokens={h.name: h.revision for h in held},
                dependencies_omitted=bool(d.get("dependencies_omitted", False)),
                raw=d,
            )
            if not self._offers(task.executor):
                # Registered with named executors, sent another one: not run here.
                ending = _Ending({
                    "outcome": "failed",
                    "error": f"agent {self.name} has no executor `{task.executor}`",
                })
            else:
                ending = await self._run_handler(task, running, lock_lost)
            if ending.outcome is not None and ending.outcome["outcome"] == "completed":
                if lock_wait_ms is not None:
                    ending.outcome["lock_wait_ms"] = lock_wait_ms
                # Its start time, for an attempt that ends before reporting ``started``.
                ending.outcome["running_ms"] = int((time.monotonic() - started.began) * 1000)
            if ending.handoff is not None:
                return await self._hand_off(started, task, ending.handoff)
            return await self._end(started, task_id, attempt, ending)
        finally:
            keepalive.cancel()
            with contextlib.suppress(BaseException):
                await keepalive
            if held:
                try:
                    await asyncio.shield(locks.release_all(held, owner))
                except Exception as e:  # noqa: BLE001
                    log.warning("could not release locks of %s (%s); they will lapse", task_id, e)

    async def _take_locks(
        self, resources: list[Resource], owner: str, running: _Running, held: list[HeldLock]
    ) -> Optional[_Ending]:
        """Takes the task's locks into ``held``; or the ending when they stayed busy, the
        store failed, or the task was stopped meanwhile."""
        assert self.locks is not None
        acquire = asyncio.create_task(
            self.locks.acquire_all(
                [{"name": r.name, "mode": r.mode} for r in resources], owner, self.id, self.lock_wait
            )
        )
        stop_waits = [
            asyncio.create_task(running.cancelled.wait()),
            asyncio.create_task(self._hard.wait()),
        ]
        try:
            await asyncio.wait([acquire, *stop_waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in stop_waits:
                w.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(BaseException):
                await acquire
            reason = (
                "worker shutting down"
                if self._hard.is_set()
                else "stopped: the task was cancelled or taken back"
            )
            return _Ending({"outcome": "released", "reason": reason})
        try:
            got = acquire.result()
        except LockError as e:
            return _Ending({"outcome": "blocked", "reason": f"lock store error: {e.message}"})
        if isinstance(got, Blocked):
            reason = f"lock `{got.resource}` busy after {int(got.waited * 1000)} ms"
            log.info("handing task back as blocked: %s", reason)
            return _Ending({"outcome": "blocked", "reason": reason})
        held.extend(got)
        return None

    async def _keepalive(
        self, msg: Msg, held: list[HeldLock], owner: str, running: _Running, lost: list[str]
    ) -> None:
        """Every third of the ack wait (and of the lock lease): an in-progress ack, and a
        renewal of the locks held; a lock found lost stops the attempt."""
        period = min(DISPATCH_ACK_WAIT, self.lock_lease) / 3
        assert self.locks is not None
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            if held:
                try:
                    await self.locks.renew(list(held), owner)
                except LockError as e:
                    log.warning("lock lost; abandoning the attempt: %s", e)
                    lost.append(f"lock lost: {e.message}")
                    running.cancelled.set()
                    return
                except Exception as e:  # noqa: BLE001 - the next renewal may succeed
                    log.debug("lock renewal failed: %s", e)

    def _offers(self, executor: str) -> bool:
        if self.executors is None:
            return True
        offered = {e.strip().lower() for e in self.executors}
        return not offered or "*" in offered or executor.strip().lower() in offered

    async def _call(self, task: Task) -> Any:
        assert self._handler is not None
        result = self._handler(task)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _run_handler(self, task: Task, running: _Running, lock_lost: list[str]) -> _Ending:
        timeout = float(max(int(task.timeout_seconds), 1)) if task.timeout_seconds is not None else self.default_timeout
        work = asyncio.create_task(self._call(task), name=f"omoi-task-{task.key}-{task.attempt}")
        cancelled = asyncio.create_task(running.cancelled.wait())
        hard = asyncio.create_task(self._hard.wait())
        try:
            done, _ = await asyncio.wait(
                [work, cancelled, hard], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cancelled.cancel()
            hard.cancel()
        if work in done:
            return self._ending_of(work)
        # Stopped: cancel the handler, let it clean up (bounded).
        work.cancel()
        await asyncio.wait([work], timeout=10.0)
        if lock_lost:
            return _Ending({"outcome": "failed", "error": lock_lost[0]})
        if running.cancelled.is_set():
            return _Ending({"outcome": "released", "reason": "stopped: the task was cancelled or taken back"})
        if self._hard.is_set():
            return _Ending({"outcome": "released", "reason": "worker shutting down"})
        secs = int(timeout) if timeout == int(timeout) else timeout
        return _Ending({"outcome": "failed", "error": f"timed out after {secs} s"})

    @staticmethod
    def _ending_of(work: "asyncio.Task[Any]") -> _Ending:
        if work.cancelled():
            return _Ending({"outcome": "failed", "error": "the handler was cancelled"})
        exc = work.exception()
        if isinstance(exc, HandOff):
            return _Ending(handoff=exc)
        if exc is not None:
            text = str(exc)
            error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            outcome: dict[str, Any] = {"outcome": "failed", "error": error}
            code = getattr(exc, "exit_code", None)
            if isinstance(code, int) and not isinstance(code, bool):
                outcome["exit_code"] = code
            return _Ending(outcome)
        result = work.result()
        if isinstance(result, HandOff):
            return _Ending(handoff=result)
        try:
            dumps(result)
        except (TypeError, ValueError) as e:
            return _Ending({"outcome": "failed", "error": f"output is not JSON: {e}"})
        path = _find_nul(result)
        if path is not None:
            return _Ending({
                "outcome": "failed",
                "error": f"output holds U+0000 (NUL) at {path}, which cannot be stored; the attempt fails",
            })
        return _Ending({"outcome": "completed", "output": result})

    async def _end(self, started: _Started, task_id: str, attempt: int, ending: _Ending) -> bool:
        assert ending.outcome is not None
        try:
            await started.settle()
            await self._report(task_id, attempt, ending.outcome)
        except Exception as e:  # noqa: BLE001
            log.warning("report on %s failed: %s", task_id, e)
            return False
        return True

    async def _report(self, task_id: str, attempt: int, outcome: dict[str, Any]) -> None:
        """Publishes a report on ``<ns>.result.<id>.<task_id>`` with ``Nats-Msg-Id``
        ``report:<task_id>:<attempt>:<outcome>``, sending it again for up to 15 s while it
        is not stored (the stream drops a duplicate)."""
        for k in ("error", "reason"):
            if isinstance(outcome.get(k), str):
                outcome[k] = _scrub(outcome[k])
        report = {"v": 1, "task_id": task_id, "attempt": attempt, "agent_id": self.id, **outcome}
        payload = dumps(report)
        if len(payload) > MAX_REPORT_BYTES:
            failed = {
                "v": 1,
                "task_id": task_id,
                "attempt": attempt,
                "agent_id": self.id,
                "outcome": "failed",
                "error": f"report of {len(payload)} bytes exceeds the {MAX_REPORT_BYTES}-byte limit",
            }
            payload = dumps(failed)
        msg_id = f"report:{task_id}:{attempt}:{outcome['outcome']}"
        subject = self.names.result(self.id, task_id)
        began = time.monotonic()
        pause = 0.1
        while True:
            try:
                js = await self._conn.js()
                await js.publish(subject, payload, headers={MSG_ID_HEADER: msg_id}, timeout=5.0)
                return
            except Exception as e:  # noqa: BLE001
                if time.monotonic() - began + pause > REPORT_RETRY_FOR:
                    raise
                log.debug("report not stored (%s); sending it again", e)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _hand_off(self, started: _Started, task: Task, ask: HandOff) -> bool:
        """Requests the handoff of the running attempt with ``release: true``; the task then
        waits for the decision (nothing to report), or fails if the request did."""
        try:
            await started.settle()
        except Exception as e:  # noqa: BLE001
            log.warning("started report failed: %s", e)
            return False
        to = ask.to_agent_id or (self.names.resolve_agent(ask.to_agent) if ask.to_agent else None)
        try:
            handoff = await self.request_handoff(
                task.task_id,
                to_agent_id=to,
                capabilities=ask.capabilities,
                reason=ask.reason,
                context=ask.context,
                on_decline=ask.on_decline,
                ttl_seconds=ask.ttl_seconds,
                release=True,
                attempt=task.attempt,
            )
            log.info("task %s handed off (handoff %s)", task.task_id, handoff.get("id"))
            return True
        except Exception as e:  # noqa: BLE001
            error = f"asked for a handoff, which failed: {e}"
            return await self._end(
                started, task.task_id, task.attempt, _Ending({"outcome": "failed", "error": error})
            )

    # ---------------------------------------------------------------- inbox

    async def inbox(self, *, idle_timeout: Optional[float] = None) -> AsyncIterator[InboxItem]:
        """The agent's durable inbox (consumer ``inbox-<id>``), in order, including what was
        sent while it was away. Each item is acked when the next one is asked for (or by
        ``await item.ack()``); an item left unacked when the iteration stops early is nak'ed,
        so it comes again. ``idle_timeout``: stop after that many seconds without an item.
        Unreadable items are dead-lettered."""
        js = await self._conn.js()
        psub = await self._bind(js, self.names.stream("inbox"), self.names.inbox_consumer(self.id))
        idle_since = time.monotonic()
        current: Optional[InboxItem] = None
        try:
            while not self._closed:
                if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    return
                wait = 1.0 if idle_timeout is None else max(0.1, min(1.0, idle_timeout - (time.monotonic() - idle_since)))
                try:
                    msgs = await psub.fetch(1, timeout=wait)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                for msg in msgs:
                    try:
                        data = json.loads(msg.data)
                        if not isinstance(data, dict) or data.get("kind") not in ("message", "handoff_offer"):
                            raise ValueError("not an inbox item (kind message or handoff_offer)")
                    except ValueError as e:
                        await self._dead_letter(msg, f"malformed payload: {e}")
                        continue
                    current = InboxItem(data, msg)
                    yield current
                    await current.ack()
                    current = None
                    idle_since = time.monotonic()
        finally:
            if current is not None and not current.settled:
                with contextlib.suppress(Exception):
                    await current.nak()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _inbox_loop(self) -> None:
        assert self._on_inbox is not None
        while not self._stop.is_set():
            try:
                async for item in self.inbox():
                    try:
                        result = self._on_inbox(item)
                        if inspect.isawaitable(result):
                            await result
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        log.warning("inbox callback failed (%s); the item comes again", e)
                        await item.nak(delay=1.0)
                    if self._stop.is_set():
                        break
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("inbox consumer failed (%s); retrying", e)
                await asyncio.sleep(1.0)

    # ---------------------------------------------------------------- collaboration

    async def _act(self, verb: str, body: Mapping[str, Any]) -> Any:
        nc = await self._conn.nc()
        return await request(nc, self.names.act(self.id, verb), dict(body), self.request_timeout)

    async def thread(
        self,
        participants: Iterable[str],
        *,
        thread_type: str = "discussion",
        task_id: Optional[str] = None,
        workflow_id: Optional[str] = None,
        title: Optional[str] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """Opens a thread with ``participants`` (ids or names; this agent is added).
        ``thread_type``: handoff, review, consultation, discussion or notification."""
        ids = [self.names.resolve_agent(p) for p in participants]
        if self.id not in ids:
            ids.insert(0, self.id)
        body: dict[str, Any] = {"thread_type": thread_type, "participants": ids}
        for k, v in (("task_id", task_id), ("workflow_id", workflow_id), ("title", title), ("metadata", metadata)):
            if v is not None:
                body[k] = v
        return await self._act("thread", body)  # type: ignore[no-any-return]

    async def messages(
        self,
        thread_id: str,
        *,
        before: Optional[str] = None,
        unread: bool = False,
        limit: Optional[int] = None,
    ) -> dict[str, Any]:
        """A page of a thread's messages, newest first (this agent must take part in it):
        ``{"messages": [...], "next_cursor": id or None}``; pass ``next_cursor`` as ``before``
        for older ones. ``unread``: only those this agent has not marked read."""
        body: dict[str, Any] = {"thread_id": thread_id}
        if before is not None:
            body["before"] = before
        if unread:
            body["unread"] = True
        if limit is not None:
            body["limit"] = limit
        return await self._act("messages", body)  # type: ignore[no-any-return]

    async def close_thread(self, thread_id: str, status: str = "resolved") -> dict[str, Any]:
        """Closes a thread this agent takes part in: ``resolved`` or ``abandoned``."""
        return await self._act("close", {"thread_id": thread_id, "status": status})  # type: ignore[no-any-return]

    async def send(
        self,
        thread_id: str,
        content: str,
        *,
        recipient_id: Optional[str] = None,
        message_type: str = "text",
        metadata: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """Sends a message in a thread (to one participant with ``recipient_id``, an id or a
        name; else to every other participant). It lands in each recipient's inbox."""
        body: dict[str, Any] = {
            "thread_id": thread_id,
            "sender_id": self.id,
            "message_type": message_type,
            "content": content,
        }
        if recipient_id is not None:
            body["recipient_id"] = self.names.resolve_agent(recipient_id)
        if metadata is not None:
            body["metadata"] = metadata
        return await self._act("send", body)  # type: ignore[no-any-return]

    async def read(self, message_id: str) -> dict[str, Any]:
        """Marks a message read by this agent; the message comes back with ``read_by``."""
        return await self._act("read", {"v": 1, "message_id": message_id})  # type: ignore[no-any-return]

    async def request_handoff(
        self,
        task_id: str,
        *,
        to_agent_id: Optional[str] = None,
        capabilities: Iterable[str] = (),
        reason: str = "",
        context: Any = None,
        on_decline: str = "reschedule",
        ttl_seconds: Optional[int] = None,
        thread_id: Optional[str] = None,
        release: bool = False,
        attempt: Optional[int] = None,
    ) -> dict[str, Any]:
        """Asks to hand task ``task_id`` to ``to_agent_id`` (an id or a name) or, with
        ``capabilities``, to the best-fit agents having them all. ``release=True`` (with the
        ``attempt``) gives the task up now: it waits for the decision. Returns the handoff."""
        body: dict[str, Any] = {
            "task_id": task_id,
            "from_agent_id": self.id,
            "capabilities": list(capabilities),
            "reason": reason,
            "on_decline": on_decline,
            "release": release,
        }
        if to_agent_id is not None:
            body["to_agent_id"] = self.names.resolve_agent(to_agent_id)
        if context is not None:
            body["context"] = context
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if thread_id is not None:
            body["thread_id"] = thread_id
        if attempt is not None:
            body["attempt"] = attempt
        return await self._act("handoff", body)  # type: ignore[no-any-return]

    async def accept_handoff(self, handoff_id: str) -> dict[str, Any]:
        """Accepts a handoff offered to this agent: the task comes as a new dispatch."""
        return await self._act("accept", {"v": 1, "handoff_id": handoff_id})  # type: ignore[no-any-return]

    async def decline_handoff(self, handoff_id: str, reason: Optional[str] = None) -> dict[str, Any]:
        """Declines a handoff (``reason`` kept as its ``decision_reason``)."""
        body: dict[str, Any] = {"v": 1, "handoff_id": handoff_id}
        if reason is not None:
            body["reason"] = reason
        return await self._act("decline", body)  # type: ignore[no-any-return]

    async def cancel_handoff(self, handoff_id: str) -> dict[str, Any]:
        """Withdraws an undecided handoff this agent requested."""
        return await self._act("cancel", {"v": 1, "handoff_id": handoff_id})  # type: ignore[no-any-return]

    async def update(self, **changes: Any) -> dict[str, Any]:
        """Changes this agent's record (``capabilities``, ``capacity``, ``status``, ``tags``,
        ``metadata``, ``executors``)."""
        record: dict[str, Any] = await self._act("update", changes)
        self.record = record
        if "capacity" in changes:
            self.capacity = int(changes["capacity"])
            self._slot_freed.set()
        return record

    async def deregister(self) -> dict[str, Any]:
        """Deregisters this agent (``<ns>.act.<id>.deregister``) and stops it."""
        record: dict[str, Any] = await self._act("deregister", {"v": 1})
        self.deregistered = True
        self.stop()
        return record

