"""Workflows over NATS (service ``omoi-workflows``; docs/protocol.md "Request/reply",
docs/api.md): submit a workflow or a pattern, read, cancel, wait, stream its events."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
import uuid
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

import nats.errors
from nats.js import api

from ._transport import Client, ConnectionLike, dumps, request
from .errors import NoResponderError, OmoiError, RequestTimeoutError, TooLargeError

__all__ = ["WorkflowClient", "TERMINAL_STATUSES"]

#: Statuses a workflow ends in.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: Room left for headers when deciding whether a request fits in one message.
HEADER_ROOM = 64 * 1024
#: A large upload takes the control plane longer to validate and store.
UPLOAD_SUBMIT_TIMEOUT = 120.0
#: How often :meth:`WorkflowClient.wait` asks for the state besides hearing the end.
WAIT_POLL = 1.0
#: …at the most: a wait pauses at least this many times as long as the last answer took.
WAIT_POLL_COST = 10


def _parse_time(text: str) -> datetime.datetime:
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    # Python < 3.11 takes at most 6 fraction digits.
    if "." in t:
        head, rest = t.split(".", 1)
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        t = f"{head}.{digits[:6].ljust(6, '0')}{rest[i:]}"
    return datetime.datetime.fromisoformat(t)


class WorkflowClient(Client):
    """Submits and follows workflows.

    ``nc_or_url`` is a connected ``nats.aio.client.Client`` (borrowed, left open) or a URL
    (connected on first use, closed by :meth:`close`)."""

    def __init__(
        self,
        nc_or_url: ConnectionLike = "nats://127.0.0.1:4222",
        *,
        namespace: str = "omoi",
        timeout: float = 30.0,
    ) -> None:
        super().__init__(nc_or_url, namespace, timeout, "omoi-py-workflows")

    async def _request(self, verb: str, body: Mapping[str, Any] | bytes, timeout: Optional[float] = None) -> Any:
        nc = await self._conn.nc()
        return await request(nc, self.names.workflow(verb), body, timeout or self.timeout)

    async def inline_limit(self) -> int:
        """The largest request sent inline: the server's ``max_payload`` less room for
        headers."""
        nc = await self._conn.nc()
        max_payload = nc.max_payload or 1024 * 1024
        return max(max_payload - HEADER_ROOM, 0)

    async def submit(self, spec: Mapping[str, Any], *, upload: Optional[bool] = None) -> dict[str, Any]:
        """Submits a workflow (``{"name", "failure_policy"?, "tasks": [...]}``, docs/api.md).
        One too large for a NATS message goes through the ``<ns>_uploads`` object store and
        ``workflow.submit_upload`` (``upload=True`` forces that way, ``False`` forbids it).
        Reply: ``{workflow_id, tasks: {key: task_id}, unschedulable, ...}``."""
        body = dumps(dict(spec))
        if upload is None:
            upload = len(body) > await self.inline_limit()
        if not upload:
            return await self._request("submit", body)  # type: ignore[no-any-return]
        return await self.submit_upload(body)

    async def submit_upload(self, body: bytes | Mapping[str, Any]) -> dict[str, Any]:
        """Puts the submission in the object store ``<ns>_uploads`` under ``submit-<uuid>``
        and asks ``<ns>.workflow.submit_upload`` to submit it (the control plane deletes the
        object once read)."""
        data = body if isinstance(body, bytes) else dumps(dict(body))
        js = await self._conn.js()
        store = await js.object_store(self.names.bucket("uploads"))
        name = f"submit-{uuid.uuid4()}"
        await store.put(name, data)
        return await self._request(  # type: ignore[no-any-return]
            "submit_upload", {"v": 1, "object": name}, max(self.timeout, UPLOAD_SUBMIT_TIMEOUT)
        )

    async def run_pattern(
        self,
        pattern: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
        *,
        source: Optional[str] = None,
    ) -> dict[str, Any]:
        """Compiles and submits a pattern — built in or in the control plane's
        ``patterns_dir`` by name, or a pattern file's text as ``source`` — with ``params``.
        Reply: the submit reply plus ``pattern``."""
        if (pattern is None) == (source is None):
            raise ValueError("give exactly one of pattern (a name) or source (a pattern file's text)")
        body: dict[str, Any] = {"params": dict(params or {})}
        if pattern is not None:
            body["pattern"] = pattern
        else:
            body["source"] = source
        return await self._request("run", body)  # type: ignore[no-any-return]

    async def get(self, workflow_id: str, *, include_tasks: bool = True) -> dict[str, Any]:
        """The workflow with its tasks (``include_tasks=False``: only ``counts``)."""
        return await self._request(  # type: ignore[no-any-return]
            "get", {"v": 1, "workflow_id": workflow_id, "include_tasks": include_tasks}
        )

    async def cancel(self, workflow_id: str) -> dict[str, Any]:
        """Cancels every unfinished task (workers stop them);
        :class:`~omoi.errors.ConflictError` if the workflow already finished."""
        return await self._request("cancel", {"v": 1, "workflow_id": workflow_id})  # type: ignore[no-any-return]

    async def wait(self, workflow_id: str, timeout: Optional[float] = None) -> dict[str, Any]:
        """Waits until the workflow is ``completed``, ``failed`` or ``cancelled`` and returns
        it with its tasks. Hears the end from its ``workflow.*`` event and asks for the state
        every second besides (less often when an answer takes long: at least ten times as long
        as the last one took), riding out a control plane that does not answer for a while.
        Raises ``TimeoutError`` after ``timeout`` seconds."""
        nc = await self._conn.nc()
        deadline = None if timeout is None else time.monotonic() + timeout
        ended = asyncio.Event()

        async def on_end(msg: Any) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(msg.data)["data"]["workflow_id"] == workflow_id:
                    ended.set()

        subs = []
        for kind in ("workflow.completed", "workflow.failed", "workflow.cancelled"):
            with contextlib.suppress(Exception):
                subs.append(await nc.subscribe(self.names.event(kind), cb=on_end))
        try:
            while True:
                asked = time.monotonic()
                try:
                    view = await self.get(workflow_id, include_tasks=False)
                    if view.get("status") in TERMINAL_STATUSES:
                        try:
                            return await self.get(workflow_id)
                        except TooLargeError:
                            return view
                except (NoResponderError, RequestTimeoutError):
                    pass
                except OmoiError as e:
                    if e.code != "unavailable":
                        raise
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError(f"workflow {workflow_id} did not finish within {timeout} s")
                # A state costs the database what it took to answer: polls take at most a tenth
                # of the time, however large the workflow.
                every = max(WAIT_POLL, WAIT_POLL_COST * (now - asked))
                pause = every if deadline is None else min(every, deadline - now)
                ended.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ended.wait(), timeout=max(pause, 0.01))
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def events(
        self,
        workflow_id: str,
        *,
        from_start: bool = True,
        until_end: bool = True,
        types: Optional[Iterable[str]] = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one workflow (envelopes ``{"v", "id", "time", "type", "data"}``)
        from the ``<ns>_events`` stream through an ordered consumer, in the order the stream
        stored them (a workflow's events in commit order), filtered by ``data.workflow_id``.

        ``from_start``: from the workflow's creation (else only new ones). ``until_end``:
        stop after its ``workflow.completed|failed|cancelled``. ``types``: only these event
        types (e.g. ``["task.completed"]``); the terminal event still ends the stream."""
        js = await self._conn.js()
        config = api.ConsumerConfig()
        policy = api.DeliverPolicy.NEW
        if from_start:
            view = await self.get(workflow_id, include_tasks=False)
            created = _parse_time(str(view["created_at"]))
            # A little earlier than the row's time: events are stamped by the NATS server.
            config.opt_start_time = created - datetime.timedelta(seconds=5)
            policy = api.DeliverPolicy.BY_START_TIME
        config.deliver_policy = policy
        wanted = None if types is None else set(types)
        sub = await js.subscribe(
            f"{self.names.ns}.>",
            stream=self.names.stream("events"),
            ordered_consumer=True,
            config=config,
            deliver_policy=policy,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                try:
                    env = json.loads(msg.data)
                    data = env.get("data") or {}
                    kind = str(env.get("type", ""))
                except (ValueError, AttributeError):
                    continue
                if not isinstance(data, dict) or data.get("workflow_id") != workflow_id:
                    continue
                if wanted is None or kind in wanted:
                    yield env
                if until_end and kind in ("workflow.completed", "workflow.failed", "workflow.cancelled"):
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
