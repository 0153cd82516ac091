"""NATS plumbing shared by the clients: a connection given or opened on demand, JSON
request/reply with omoi's error replies, dead letters."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Mapping, TypeVar, Union

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .errors import BadReplyError, NoResponderError, RequestTimeoutError, error_for
from .names import Names

#: Header that names a service error's status (docs/protocol.md).
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
DEADLETTER_REASON_HEADER = "Omoi-Deadletter-Reason"
ORIGINAL_SUBJECT_HEADER = "Omoi-Original-Subject"
MSG_ID_HEADER = "Nats-Msg-Id"

ConnectionLike = Union[NATS, str]


def dumps(value: Any) -> bytes:
    """Compact JSON, as UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Connection:
    """A NATS connection that is either borrowed (a connected ``nats.aio.client.Client``) or
    opened on first use from a URL (comma-separated for a cluster) and then owned: closed by
    :meth:`close`."""

    def __init__(self, nc_or_url: ConnectionLike, name: str) -> None:
        self._given: NATS | None = None
        self._url: str | None = None
        if isinstance(nc_or_url, str):
            self._url = nc_or_url
        else:
            self._given = nc_or_url
        self._nc: NATS | None = self._given
        self._js: JetStreamContext | None = None
        self._name = name
        self._lock = asyncio.Lock()

    @property
    def owned(self) -> bool:
        return self._given is None

    async def nc(self) -> NATS:
        if self._nc is not None and not self._nc.is_closed:
            return self._nc
        async with self._lock:
            if self._nc is None or (self.owned and self._nc.is_closed):
                assert self._url is not None
                servers = [s.strip() for s in self._url.split(",") if s.strip()]
                self._nc = await nats.connect(
                    servers=servers,
                    name=self._name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                )
                self._js = None
        assert self._nc is not None
        return self._nc

    async def js(self) -> JetStreamContext:
        nc = await self.nc()
        if self._js is None:
            self._js = nc.jetstream(timeout=10.0)
        return self._js

    async def close(self) -> None:
        """Closes the connection if this object opened it (a borrowed one is left open)."""
        if self.owned and self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.close()  # flushes what is buffered
            except Exception:  # noqa: BLE001 - closed anyway
                pass
        if self.owned:
            self._nc = None
            self._js = None


def _is_error_reply(msg: Msg) -> bool:
    return bool(msg.headers) and ERROR_CODE_HEADER in (msg.headers or {})


def parse_reply(msg: Msg, subject: str) -> Any:
    """The result of a reply, or raises its :class:`~omoi.errors.OmoiError`."""
    if _is_error_reply(msg):
        headers = msg.headers or {}
        try:
            status: int | None = int(headers.get(ERROR_CODE_HEADER, ""))
        except ValueError:
            status = None
        try:
            body = json.loads(msg.data)
            error = body["error"]
            if not isinstance(error, dict):
                raise TypeError("error is not an object")
        except (ValueError, KeyError, TypeError):
            error = {
                "code": "internal",
                "message": headers.get(ERROR_HEADER, "") or msg.data.decode("utf-8", "replace"),
            }
        raise error_for(error, status, subject=subject)
    try:
        return json.loads(msg.data)
    except ValueError as e:
        raise BadReplyError(message=f"unreadable reply on {subject}: {e}", subject=subject) from e


#: The protocol version this SDK speaks (docs/protocol.md).
PROTOCOL_VERSION = 1


async def request(
    nc: NATS,
    subject: str,
    body: Mapping[str, Any] | bytes,
    timeout: float,
) -> Any:
    """JSON request/reply: the reply's result, or its error as an exception. Every request
    carries the protocol version (``"v": 1``) unless the body names one."""
    payload = body if isinstance(body, bytes) else dumps({"v": PROTOCOL_VERSION, **body})
    try:
        msg = await nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError as e:
        raise NoResponderError(
            message=f"no omoi control plane answers on {subject}", subject=subject
        ) from e
    except (nats.errors.TimeoutError, asyncio.TimeoutError) as e:
        raise RequestTimeoutError(
            message=f"no reply on {subject} within {timeout:g} s", subject=subject
        ) from e
    return parse_reply(msg, subject)


def _clean_reason(reason: str) -> str:
    return "".join(" " if (ord(c) < 32 or 0x7F <= ord(c) < 0xA0) else c for c in reason)[:512]


async def dead_letter(
    js: JetStreamContext,
    names: Names,
    subject: str,
    stream_sequence: int,
    payload: bytes,
    reason: str,
) -> None:
    """Republishes ``payload`` on ``<ns>.deadletter.<subject without "<ns>.">`` with the
    headers ``Omoi-Deadletter-Reason`` and ``Omoi-Original-Subject``, as omoi does
    (``Nats-Msg-Id`` ``dl:<subject>:<stream sequence>``, so a redelivered bad message is
    dead-lettered once)."""
    headers = {
        DEADLETTER_REASON_HEADER: _clean_reason(reason),
        ORIGINAL_SUBJECT_HEADER: subject,
    }
    if stream_sequence > 0:
        headers[MSG_ID_HEADER] = f"dl:{subject}:{stream_sequence}"
    await js.publish(names.deadletter(subject), payload, headers=headers)


_C = TypeVar("_C", bound="Client")


class Client:
    """What the SDK's clients share: a namespace, a request timeout and a connection that is
    borrowed (a connected ``nats.aio.client.Client``, left open) or owned (a URL, connected
    on first use and closed by :meth:`close`)."""

    def __init__(self, nc_or_url: ConnectionLike, namespace: str, timeout: float, name: str) -> None:
        self.names = Names(namespace)
        self.timeout = timeout
        self._conn = Connection(nc_or_url, name)

    async def __aenter__(self: _C) -> _C:
        await self._conn.nc()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._conn.close()

    @property
    def namespace(self) -> str:
        return self.names.ns
