"""Resource locks in the ``<ns>_locks`` KV bucket, interoperating exactly with omoi's own
workers (docs/protocol.md "Resource locks"; src/bus/kv_lock.rs).

- One key per resource (:func:`lock_key` escapes the name); its value is the JSON
  ``{"mode", "holders": [...], "waiters": [...]}``.
- Expiry lives in the value (``expires_at_ms``, wall clock); lapsed entries are ignored by
  readers and pruned by the next writer. Keys are never deleted.
- Every write is a create (key absent) or a revision-checked update; on a conflict the state
  is read again and the decision made again.
- The KV revision of the granting write is the fencing token.
- Waiters are served first come, first served: only the head of the queue (or a run of
  shared waiters at its head) may take a free lock.
- :meth:`LockManager.acquire_all` takes resources in name order, so crossing sets cannot
  deadlock; on giving up it releases what it took and leaves the queues it joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Literal, Mapping, Sequence, TypeVar, Union

import nats.js.errors
from nats.js.kv import KeyValue

from ._transport import dumps
from .errors import LockError

__all__ = [
    "LockMode",
    "Holder",
    "Waiter",
    "LockState",
    "Acquired",
    "Busy",
    "HeldLock",
    "Blocked",
    "LockManager",
    "lock_key",
    "lock_name",
    "validate_resource_name",
]

LockMode = Literal["exclusive", "shared"]

#: Longest resource name, in characters.
MAX_RESOURCE_NAME_CHARS = 200
#: How often one operation re-reads and retries after losing a compare-and-set race.
MAX_CONFLICTS = 10
#: Backoff between polls of a busy lock: base and cap, seconds (jittered, doubling).
POLL_BASE = 0.020
POLL_MAX = 0.500


def now_ms() -> int:
    return int(time.time() * 1000)


def validate_resource_name(name: str) -> None:
    """Raises ``ValueError`` unless ``name`` has 1 to 200 characters, none of them whitespace
    or control characters."""
    if not name:
        raise ValueError("resource name is empty")
    if len(name) > MAX_RESOURCE_NAME_CHARS:
        raise ValueError(
            f"resource name has {len(name)} characters; at most {MAX_RESOURCE_NAME_CHARS} are allowed"
        )
    for c in name:
        if c.isspace() or unicodedata.category(c) == "Cc":
            raise ValueError(f"resource name contains whitespace or a control character ({c!r})")


def _plain(b: int) -> bool:
    return (
        (0x30 <= b <= 0x39)
        or (0x41 <= b <= 0x5A)
        or (0x61 <= b <= 0x7A)
        or b in (0x2D, 0x2F, 0x5F, 0x2E)  # - / _ .
    )


def lock_key(name: str) -> str:
    """The KV key of the lock on resource ``name``: bytes of ``[-/_.a-zA-Z0-9]`` are kept,
    every other byte (``=`` too) becomes ``=XX`` (uppercase hex); a ``.`` or ``/`` at either
    end and a ``.`` right after another ``.`` are escaped too. ``repo:api`` →
    ``repo=3Aapi``."""
    data = name.encode("utf-8")
    last = max(len(data) - 1, 0)
    out: list[str] = []
    for i, b in enumerate(data):
        at_edge = i == 0 or i == last
        escape = (
            not _plain(b)
            or (b in (0x2E, 0x2F) and at_edge)
            or (b == 0x2E and i > 0 and data[i - 1] == 0x2E)
        )
        out.append(f"={b:02X}" if escape else chr(b))
    return "".join(out)


def lock_name(key: str) -> str | None:
    """The resource name of a lock key (the inverse of :func:`lock_key`), or ``None``."""
    out = bytearray()
    i = 0
    raw = key.encode("utf-8", "surrogateescape")
    while i < len(raw):
        b = raw[i]
        if b == 0x3D:  # '='
            hexpart = raw[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(
                (0x30 <= h <= 0x39) or (0x41 <= h <= 0x46) for h in hexpart
            ):
                return None
            out.append(int(hexpart.decode(), 16))
            i += 3
        elif _plain(b):
            out.append(b)
            i += 1
        else:
            return None
    try:
        name = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if lock_key(name) == key else None


@dataclass
class Holder:
    owner: str
    agent_id: str | None
    acquired_at_ms: int
    expires_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "agent_id": self.agent_id,
            "acquired_at_ms": self.acquired_at_ms,
            "expires_at_ms": self.expires_at_ms,
        }


@dataclass
class Waiter:
    owner: str
    mode: LockMode
    since_ms: int
    expires_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "mode": self.mode,
            "since_ms": self.since_ms,
            "expires_at_ms": self.expires_at_ms,
        }


def _mode(value: Any) -> LockMode:
    if value == "exclusive":
        return "exclusive"
    if value == "shared":
        return "shared"
    raise ValueError(f"unknown lock mode {value!r}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is not an integer")
    return value


@dataclass
class LockState:
    """The value stored under a lock key."""

    mode: LockMode | None = None
    holders: list[Holder] = field(default_factory=list)
    waiters: list[Waiter] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: bytes) -> "LockState":
        """Parses a stored value (``ValueError`` if it is not one)."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("lock value is not an object")
        mode = raw.get("mode")
        holders = []
        for h in raw.get("holders") or []:
            agent = h.get("agent_id")
            holders.append(
                Holder(
                    owner=str(h["owner"]),
                    agent_id=agent if isinstance(agent, str) else None,
                    acquired_at_ms=_int(h["acquired_at_ms"], "acquired_at_ms"),
                    expires_at_ms=_int(h["expires_at_ms"], "expires_at_ms"),
                )
            )
        waiters = []
        for w in raw.get("waiters") or []:
            waiters.append(
                Waiter(
                    owner=str(w["owner"]),
                    mode=_mode(w["mode"]),
                    since_ms=_int(w["since_ms"], "since_ms"),
                    expires_at_ms=_int(w["expires_at_ms"], "expires_at_ms"),
                )
            )
        return cls(mode=None if mode is None else _mode(mode), holders=holders, waiters=waiters)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "holders": [h.to_json() for h in self.holders],
            "waiters": [w.to_json() for w in self.waiters],
        }

    def copy(self) -> "LockState":
        return LockState(
            mode=self.mode,
            holders=[Holder(**vars(h)) for h in self.holders],
            waiters=[Waiter(**vars(w)) for w in self.waiters],
        )

    def live_holders(self, now: int) -> list[Holder]:
        return [h for h in self.holders if h.expires_at_ms > now]

    def live_waiters(self, now: int) -> list[Waiter]:
        return [w for w in self.waiters if w.expires_at_ms > now]

    def is_live(self, now: int) -> bool:
        return bool(self.live_holders(now) or self.live_waiters(now))

    def prune(self, now: int, keep: str | None = None) -> bool:
        """Drops lapsed holders (except ``keep``'s) and waiters, orders the queue, clears the
        mode of an empty lock. Whether anything changed."""
        before = self.copy()
        self.holders = [h for h in self.holders if h.expires_at_ms > now or h.owner == keep]
        self.waiters = [w for w in self.waiters if w.expires_at_ms > now]
        self.waiters.sort(key=lambda w: w.since_ms)
        if not self.holders:
            self.mode = None
        return self != before

    def remove_owner(self, owner: str) -> bool:
        before = (len(self.holders), len(self.waiters))
        self.holders = [h for h in self.holders if h.owner != owner]
        self.waiters = [w for w in self.waiters if w.owner != owner]
        if not self.holders:
            self.mode = None
        return before != (len(self.holders), len(self.waiters))


@dataclass
class _Plan:
    write: LockState | None
    granted: bool
    position: int
    holders: list[Holder]


def plan_acquire(
    state: LockState,
    now: int,
    lease_ms: int,
    mode: LockMode,
    owner: str,
    agent_id: str | None,
) -> _Plan:
    """The decision of one try to lock, on one read state (the same as omoi's)."""
    dirty = state.prune(now, None)
    expires = now + lease_ms

    # Re-acquiring by a current holder renews the hold.
    index = next((i for i, h in enumerate(state.holders) if h.owner == owner), None)
    if index is not None:
        upgrade = mode == "exclusive" and state.mode == "shared"
        if upgrade and len(state.holders) > 1:
            return _Plan(state if dirty else None, False, 0, list(state.holders))
        holder = state.holders[index]
        holder.expires_at_ms = expires
        if agent_id is not None:
            holder.agent_id = agent_id
        if upgrade:
            state.mode = "exclusive"
        state.waiters = [w for w in state.waiters if w.owner != owner]
        return _Plan(state, True, 0, [])

    # Join the queue, or refresh the place already in it.
    place = next((i for i, w in enumerate(state.waiters) if w.owner == owner), None)
    if place is not None:
        waiter = state.waiters[place]
        if waiter.mode != mode:
            waiter.mode = mode
            dirty = True
        # Refreshing only past half the lease saves writes.
        if waiter.expires_at_ms - now < lease_ms // 2:
            waiter.expires_at_ms = expires
            dirty = True
    else:
        # Never before the tail, whatever this process' clock says.
        since = max(state.waiters[-1].since_ms, now) if state.waiters else now
        state.waiters.append(Waiter(owner, mode, since, expires))
        dirty = True
        place = len(state.waiters) - 1

    first_in_line = place == 0 or (
        mode == "shared" and all(w.mode == "shared" for w in state.waiters[:place])
    )
    compatible = not state.holders or (mode == "shared" and state.mode == "shared")
    if first_in_line and compatible:
        del state.waiters[place]
        state.holders.append(Holder(owner, agent_id, now, expires))
        state.mode = mode
        return _Plan(state, True, 0, [])
    return _Plan(state if dirty else None, False, place, list(state.holders))


@dataclass(frozen=True)
class Acquired:
    """Granted (or renewed); ``revision`` is the fencing token."""

    revision: int


@dataclass(frozen=True)
class Busy:
    """Held by others, or others are first in line; the caller is queued at ``position``."""

    holders: list[Holder]
    position: int


@dataclass(frozen=True)
class HeldLock:
    """One lock taken: resource ``name`` in ``mode``, fencing token ``revision``."""

    name: str
    mode: LockMode
    revision: int


@dataclass(frozen=True)
class Blocked:
    """``resource`` stayed busy for ``waited`` seconds; nothing is held, no queue entry left."""

    resource: str
    waited: float


ResourceLike = Union[str, Mapping[str, Any], tuple[str, str]]
T = TypeVar("T")


def _resource(r: Any) -> tuple[str, LockMode]:
    if isinstance(r, str):
        return r, "exclusive"
    if isinstance(r, tuple):
        return str(r[0]), _mode(r[1])
    if isinstance(r, Mapping):
        return str(r["name"]), _mode(r.get("mode") or "exclusive")
    name = getattr(r, "name")
    return str(name), _mode(getattr(r, "mode", "exclusive") or "exclusive")


class LockManager:
    """Locks resources in the ``<ns>_locks`` bucket on behalf of owners (omoi's workers use
    ``<task_id>:<attempt>``), granting holds and queue places of ``lease`` seconds."""

    def __init__(self, kv: KeyValue, lease: float = 15.0) -> None:
        self.kv = kv
        self.lease = lease

    @property
    def lease_ms(self) -> int:
        return int(self.lease * 1000)

    async def _read(self, key: str) -> tuple[bytes | None, int | None]:
        """The value (``None``: none, or a delete marker) and the revision to
        compare-and-set against (``None``: no entry at all, so create)."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError as e:
            marker = getattr(e, "entry", None)
            if marker is not None and getattr(marker, "revision", None):
                return None, int(marker.revision)
            return None, None
        return entry.value, entry.revision

    async def _write(self, key: str, state: LockState, revision: int | None) -> int | None:
        value = dumps(state.to_json())
        try:
            # A create is an update expecting no previous entry (last sequence 0).
            return await self.kv.update(key, value, last=revision or 0)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except nats.js.errors.APIError as e:
            if getattr(e, "err_code", None) in (10071, 10164):
                return None
            raise

    async def _modify(
        self,
        name: str,
        overwrite_unreadable: bool,
        decide: Callable[[LockState, int], tuple[LockState | None, T]],
    ) -> tuple[T, int | None]:
        try:
            validate_resource_name(name)
        except ValueError as e:
            raise LockError(message=f"lock {name}: {e}") from e
        key = lock_key(name)
        for attempt in range(MAX_CONFLICTS):
            if attempt > 0:
                await asyncio.sleep(random.randint(0, 2 * attempt) / 1000)
            try:
                value, revision = await self._read(key)
            except Exception as e:  # noqa: BLE001
                raise LockError(message=f"lock {name}: read: {e}") from e
            if value is None:
                state = LockState()
            else:
                try:
                    state = LockState.from_json(value)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    if not overwrite_unreadable:
                        raise LockError(
                            message=f"lock {name}: unreadable lock value ({e}); an operator can clear it with a force release"
                        ) from e
                    state = LockState()
            nxt, answer = decide(state, now_ms())
            if nxt is None:
                return answer, None
            try:
                written = await self._write(key, nxt, revision)
            except LockError:
                raise
            except Exception as e:  # noqa: BLE001
                raise LockError(message=f"lock {name}: write: {e}") from e
            if written is not None:
                return answer, written
        raise LockError(message=f"lock {name}: gave up after {MAX_CONFLICTS} conflicting writes")

    async def read(self, name: str) -> LockState:
        """The state of ``name``'s lock as stored (lapsed entries included)."""
        value, _ = await self._read(lock_key(name))
        return LockState() if value is None else LockState.from_json(value)

    async def try_acquire(
        self, name: str, mode: LockMode, owner: str, agent_id: str | None = None
    ) -> Acquired | Busy:
        """Tries once to lock ``name`` in ``mode`` for ``owner``; queued (or its place
        refreshed) when busy."""
        lease_ms = self.lease_ms

        def decide(state: LockState, now: int) -> tuple[LockState | None, _Plan]:
            plan = plan_acquire(state, now, lease_ms, mode, owner, agent_id)
            return plan.write, plan

        plan, revision = await self._modify(name, False, decide)
        if plan.granted:
            if revision is None:
                raise LockError(message=f"lock {name}: grant was not written")
            return Acquired(revision)
        return Busy(plan.holders, plan.position)

    async def acquire_all(
        self,
        resources: Iterable[Any],
        owner: str,
        agent_id: str | None = None,
        max_wait: float = 10.0,
    ) -> list[HeldLock] | Blocked:
        """Locks every resource (names, ``{"name", "mode"}`` mappings, ``(name, mode)``
        pairs) for ``owner``, in name order (duplicates merged, exclusive winning), polling a
        busy one with jittered backoff and keeping those taken renewed. After ``max_wait``
        seconds it releases what it took, leaves the queues it joined and returns
        :class:`Blocked`. Cancelled, it cleans up the same way."""
        wanted: dict[str, LockMode] = {}
        for r in resources:
            name, mode = _resource(r)
            try:
                validate_resource_name(name)
            except ValueError as e:
                raise LockError(message=f"lock {name}: {e}") from e
            if wanted.get(name) != "exclusive":
                wanted[name] = "exclusive" if mode == "exclusive" else wanted.get(name, mode)
        started = time.monotonic()
        held: list[HeldLock] = []
        renewed_at = time.monotonic()
        current = ""
        try:
            for name in sorted(wanted):
                current = name
                mode = wanted[name]
                polls = 0
                while True:
                    answer = await self.try_acquire(name, mode, owner, agent_id)
                    if isinstance(answer, Acquired):
                        held.append(HeldLock(name, mode, answer.revision))
                        current = ""
                        break
                    waited = time.monotonic() - started
                    if waited >= max_wait:
                        await self._abandon(held, name, owner)
                        return Blocked(name, waited)
                    polls += 1
                    step = min(POLL_MAX, POLL_BASE * (2 ** min(polls - 1, 20)))
                    delay = step / 2 + random.uniform(0, step / 2)
                    delay = min(delay, self.lease / 3, max_wait - waited)
                    await asyncio.sleep(max(delay, 0))
                    if held and time.monotonic() - renewed_at >= self.lease / 3:
                        await self.renew(held, owner)
                        renewed_at = time.monotonic()
        except BaseException:
            # Failed or cancelled: leave nothing behind (shielded from the cancellation).
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._abandon(held, current, owner))
            raise
        return held

    async def _abandon(self, held: Sequence[HeldLock], waiting_on: str, owner: str) -> None:
        names = [h.name for h in held] + ([waiting_on] if waiting_on else [])
        for name in names:
            with contextlib.suppress(Exception):
                await self.withdraw(name, owner)

    async def renew(self, held: Sequence[HeldLock], owner: str) -> None:
        """Pushes each hold of ``owner`` to now + lease. Raises :class:`~omoi.errors.LockError`
        when ``owner`` no longer holds one of them: the work it protects must stop, its fencing
        token is stale."""
        lease_ms = self.lease_ms
        for lock in held:

            def decide(state: LockState, now: int) -> tuple[LockState | None, bool]:
                state.prune(now, owner)
                for h in state.holders:
                    if h.owner == owner:
                        h.expires_at_ms = now + lease_ms
                        return state, True
                return None, False

            holds, _ = await self._modify(lock.name, False, decide)
            if not holds:
                raise LockError(
                    message=f"lock {lock.name}: lock lost: {owner} no longer holds it (fencing token {lock.revision} is stale)"
                )

    async def release_all(self, held: Sequence[HeldLock], owner: str) -> None:
        """Releases each of ``owner``'s holds and queue places (idempotent)."""
        for lock in held:
            await self.withdraw(lock.name, owner)

    async def withdraw(self, name: str, owner: str) -> None:
        """Removes ``owner`` from lock ``name``: its hold and its queue place (idempotent)."""

        def decide(state: LockState, now: int) -> tuple[LockState | None, None]:
            if not state.remove_owner(owner):
                return None, None
            state.prune(now, None)
            return state, None

        await self._modify(name, False, decide)

    async def list(self) -> list[tuple[str, LockState]]:
        """Every lock with a live holder or waiter, by resource name."""
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        now = now_ms()
        out = []
        for key in keys:
            name = lock_name(key)
            if name is None:
                continue
            try:
                state = await self.read(name)
            except (ValueError, KeyError, TypeError):
                continue
            state.prune(now, None)
            if state.is_live(now):
                out.append((name, state))
        out.sort(key=lambda x: x[0])
        return out

    @contextlib.asynccontextmanager
    async def hold(
        self,
        resources: Iterable[Any],
        owner: str,
        agent_id: str | None = None,
        max_wait: float = 10.0,
    ) -> AsyncIterator[dict[str, int]]:
        """Holds ``resources`` for the body of an ``async with``, renewing them every third
        of the lease; yields the fencing tokens by resource name. Raises
        :class:`~omoi.errors.LockError` if they stay busy past ``max_wait``. If a renewal
        finds a lock lost, the body's task is cancelled and :class:`~omoi.errors.LockError`
        raised."""
        got = await self.acquire_all(resources, owner, agent_id, max_wait)
        if isinstance(got, Blocked):
            raise LockError(message=f"lock `{got.resource}` busy after {int(got.waited * 1000)} ms")
        body = asyncio.current_task()
        lost: list[LockError] = []

        async def renewing() -> None:
            while True:
                await asyncio.sleep(self.lease / 3)
                try:
                    await self.renew(got, owner)
                except LockError as e:
                    lost.append(e)
                    if body is not None:
                        body.cancel()
                    return
                except Exception:  # noqa: BLE001 - the next renewal may succeed
                    pass

        renewer = asyncio.create_task(renewing())
        try:
            yield {h.name: h.revision for h in got}
        except asyncio.CancelledError:
            if lost:
                raise lost[0] from None
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release_all(got, owner))
