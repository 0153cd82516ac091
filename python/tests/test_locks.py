"""Resource locks: the decision logic (the same cases as src/bus/kv_lock.rs) and two Python
agents contending for one exclusive resource."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import nats

from omoi import Agent, LockManager, Task, lock_key
from omoi.locks import Acquired, Blocked, Busy, LockState, plan_acquire
from support import ControlPlane, eventually, run, unique

LEASE = 1_000


def step(state: LockState, now: int, mode: str, owner: str) -> Optional[int]:
    plan = plan_acquire(state.copy(), now, LEASE, mode, owner, None)  # type: ignore[arg-type]
    if plan.write is not None:
        state.mode, state.holders, state.waiters = plan.write.mode, plan.write.holders, plan.write.waiters
    return None if plan.granted else plan.position


def test_exclusive_excludes_everyone_and_a_holder_renews() -> None:
    s = LockState()
    assert step(s, 0, "exclusive", "a") is None
    assert step(s, 1, "exclusive", "b") == 0
    assert step(s, 2, "shared", "c") == 1
    assert step(s, 600, "exclusive", "a") is None
    assert s.holders[0].expires_at_ms == 1_600 and len(s.holders) == 1


def test_shared_holders_coexist_until_an_exclusive_waiter_queues() -> None:
    s = LockState()
    assert step(s, 0, "shared", "a") is None
    assert step(s, 0, "shared", "b") is None
    assert step(s, 0, "exclusive", "w") == 0
    assert step(s, 0, "shared", "c") == 1
    s.remove_owner("a")
    s.remove_owner("b")
    assert step(s, 1, "shared", "c") == 1
    assert step(s, 1, "exclusive", "w") is None
    assert step(s, 2, "shared", "c") == 0


def test_a_run_of_shared_waiters_at_the_head_is_let_in_together() -> None:
    s = LockState()
    assert step(s, 0, "exclusive", "x") is None
    assert step(s, 1, "shared", "a") == 0
    assert step(s, 2, "shared", "b") == 1
    assert step(s, 3, "exclusive", "w") == 2
    assert step(s, 4, "shared", "c") == 3
    s.remove_owner("x")
    assert step(s, 5, "shared", "b") is None
    assert step(s, 5, "shared", "c") == 2
    assert step(s, 5, "shared", "a") is None
    assert step(s, 5, "exclusive", "w") == 0


def test_waiters_are_served_in_arrival_order_and_lapse() -> None:
    s = LockState()
    assert step(s, 0, "exclusive", "a") is None
    assert step(s, 10, "exclusive", "b") == 0
    assert step(s, 5, "exclusive", "c") == 1  # c's clock runs behind: still after b
    s.remove_owner("a")
    assert step(s, 20, "exclusive", "c") == 1
    assert step(s, 20, "exclusive", "b") is None
    assert step(s, 1_021, "exclusive", "c") is None  # b's hold lapsed
    assert [h.owner for h in s.holders] == ["c"]


def test_a_polling_waiter_writes_only_when_its_place_needs_refreshing() -> None:
    s = LockState()
    step(s, 0, "exclusive", "a")
    step(s, 0, "exclusive", "b")
    plan = plan_acquire(s.copy(), 100, LEASE, "exclusive", "b", None)
    assert plan.write is None and not plan.granted
    plan = plan_acquire(s.copy(), 600, LEASE, "exclusive", "b", None)
    assert plan.write is not None and plan.write.waiters[0].expires_at_ms == 1_600


def test_a_sole_shared_holder_upgrades_but_not_past_another_holder() -> None:
    s = LockState()
    step(s, 0, "shared", "a")
    assert step(s, 0, "exclusive", "a") is None and s.mode == "exclusive"
    s = LockState()
    step(s, 0, "shared", "a")
    step(s, 0, "shared", "b")
    assert step(s, 0, "exclusive", "a") == 0 and s.waiters == []


def test_the_stored_value_has_omois_shape(plane: ControlPlane) -> None:
    """A Python lock reads and writes the same JSON as omoi's: `{mode, holders, waiters}`,
    keys escaped, fencing tokens are KV revisions that grow."""

    async def main() -> None:
        nc = await nats.connect(plane.nats_url)
        kv = await nc.jetstream().key_value(f"{plane.ns}_locks")
        locks = LockManager(kv, lease=5.0)
        name = f"repo:{unique('api')}"
        first = await locks.try_acquire(name, "exclusive", "t1:1", "agent-1")
        assert isinstance(first, Acquired)
        busy = await locks.try_acquire(name, "exclusive", "t2:1")
        assert isinstance(busy, Busy) and busy.position == 0 and busy.holders[0].owner == "t1:1"
        entry = await kv.get(lock_key(name))
        raw = json.loads(entry.value or b"{}")
        assert set(raw) == {"mode", "holders", "waiters"} and raw["mode"] == "exclusive"
        assert set(raw["holders"][0]) == {"owner", "agent_id", "acquired_at_ms", "expires_at_ms"}
        assert set(raw["waiters"][0]) == {"owner", "mode", "since_ms", "expires_at_ms"}
        assert lock_key(name).startswith("repo=3A")
        await locks.withdraw(name, "t1:1")
        second = await locks.try_acquire(name, "exclusive", "t2:1")
        assert isinstance(second, Acquired) and second.revision > first.revision
        # Giving up after a wait leaves no queue place behind.
        blocked = await locks.acquire_all([name], "t3:1", max_wait=0.3)
        assert isinstance(blocked, Blocked) and blocked.resource == name
        state = await locks.read(name)
        assert [w.owner for w in state.waiters] == [] and [h.owner for h in state.holders] == ["t2:1"]
        listed = dict(await locks.list())
        assert name in listed
        await locks.release_all([], "t2:1")
        await locks.withdraw(name, "t2:1")
        assert name not in dict(await locks.list())
        async with locks.hold([name, (name, "shared")], "t4:1") as tokens:
            assert tokens[name] > second.revision
        await nc.close()

    run(main())


def test_two_python_agents_never_overlap_on_an_exclusive_resource(plane: ControlPlane) -> None:
    cap = unique("lock")
    resource = f"db:{unique('main')}"
    runs: list[tuple[float, float, int, str]] = []
    inside = 0
    overlaps = 0

    def handler_for(who: str) -> Any:
        async def handle(task: Task) -> dict[str, Any]:
            nonlocal inside, overlaps
            inside += 1
            if inside > 1:
                overlaps += 1
            began = time.monotonic()
            try:
                # One task outlives the lease: its lock must be renewed, not lapse.
                await asyncio.sleep(float(task.input["secs"]))
            finally:
                inside -= 1
            runs.append((began, time.monotonic(), task.lock_tokens[resource], who))
            return {"token": task.lock_tokens[resource]}

        return handle

    async def main() -> None:
        a = Agent(plane.nats_url, name=unique("lock-a"), capabilities=[cap], capacity=2, namespace=plane.ns,
                  handler=handler_for("a"), lock_lease=1.5, lock_wait=30.0)
        b = Agent(plane.nats_url, name=unique("lock-b"), capabilities=[cap], capacity=2, namespace=plane.ns,
                  handler=handler_for("b"), lock_lease=1.5, lock_wait=30.0)
        async with a, b, plane.workflows() as wf:
            tasks = [
                {
                    "key": f"t{i}",
                    "capabilities": [cap],
                    "resources": [{"name": resource, "mode": "exclusive"}],
                    "input": {"secs": 2.5 if i == 0 else 0.1},
                }
                for i in range(8)
            ]
            sub = await wf.submit({"name": "locks", "tasks": tasks})
            view = await wf.wait(sub["workflow_id"], timeout=120)
        assert view["status"] == "completed", view
        assert overlaps == 0
        runs.sort()
        for (s1, e1, t1, _), (s2, e2, t2, _) in zip(runs, runs[1:]):
            assert e1 <= s2, "two holders of an exclusive lock overlapped"
            assert t2 > t1, "fencing tokens must grow from one holder to the next"
        assert len(runs) == 8
        assert {who for *_, who in runs} == {"a", "b"}, runs
        # lock_wait_ms is reported on completed attempts that locked.
        assert all(t["lock_wait_ms"] is not None for t in view["tasks"])

    run(main())


def test_a_busy_lock_hands_the_task_back_blocked_and_it_runs_once_free(plane: ControlPlane) -> None:
    cap = unique("blocked")
    resource = f"deploy:{unique('prod')}"
    ran: list[int] = []

    async def handle(task: Task) -> dict[str, Any]:
        ran.append(task.attempt)
        return {"token": task.lock_tokens[resource]}

    async def main() -> None:
        nc = await nats.connect(plane.nats_url)
        locks = LockManager(await nc.jetstream().key_value(f"{plane.ns}_locks"), lease=30.0)
        # An operator (or any other holder) has the resource.
        held = await locks.acquire_all([resource], "operator:1", None, max_wait=10)
        assert not isinstance(held, Blocked)
        agent = Agent(plane.nats_url, name=unique("blocked-agent"), capabilities=[cap], namespace=plane.ns,
                      handler=handle, lock_wait=0.3)
        async with agent, plane.workflows() as wf:
            sub = await wf.submit({"name": "blocked", "tasks": [{"key": "b", "capabilities": [cap], "resources": [{"name": resource}]}]})

            async def handed_back() -> bool:
                view = await wf.get(sub["workflow_id"])
                return view["tasks"][0]["attempt"] >= 2

            await eventually(handed_back, "the task to be handed back blocked and dispatched again", 60)
            assert ran == []  # never ran while the lock was busy
            await locks.release_all(held, "operator:1")
            view = await wf.wait(sub["workflow_id"], timeout=60)
        await nc.close()
        task = view["tasks"][0]
        assert view["status"] == "completed" and task["failures"] == 0  # blocked is not a failure
        assert task["output"]["token"] > held[0].revision and len(ran) == 1

    run(main())


def test_a_long_task_keeps_its_dispatch_and_its_lock_alive(plane: ControlPlane) -> None:
    """A task running longer than the dispatch's 30 s ack wait and twice the lock lease is
    neither redelivered nor loses its lock: in-progress acks and renewals keep both."""
    cap = unique("long")
    resource = f"db:{unique('long')}"
    lease = 4.0
    started = asyncio.Event()
    handler_done = False

    async def handle(task: Task) -> dict[str, Any]:
        nonlocal handler_done
        started.set()
        await asyncio.sleep(33)
        handler_done = True  # the lock is released only after this
        return {"token": task.lock_tokens[resource]}

    async def main() -> None:
        nc = await nats.connect(plane.nats_url)
        js = nc.jetstream()
        probe = LockManager(await js.key_value(f"{plane.ns}_locks"), lease=lease)
        agent = Agent(plane.nats_url, name=unique("long-agent"), capabilities=[cap], namespace=plane.ns,
                      handler=handle, lock_lease=lease)
        async with agent, plane.workflows() as wf:
            sub = await wf.submit({"name": "long", "tasks": [{"key": "l", "capabilities": [cap], "resources": [{"name": resource}]}]})
            await asyncio.wait_for(started.wait(), 60)
            checks = 0
            done = asyncio.create_task(wf.wait(sub["workflow_id"], timeout=120))
            while not done.done():
                await asyncio.sleep(lease)
                if done.done():
                    break
                # Several leases later the lock is still held: renewed, not lapsed.
                answer = await probe.try_acquire(resource, "exclusive", "probe:1")
                await probe.withdraw(resource, "probe:1")
                if not handler_done:
                    assert not isinstance(answer, Acquired), "the lock lapsed while its task ran"
                    checks += 1
            view = done.result()
            info = await js.consumer_info(f"{plane.ns}_dispatch", f"agent-{agent.id}")
        await nc.close()
        assert view["status"] == "completed" and view["tasks"][0]["attempt"] == 1
        assert checks >= 3
        assert info.num_redelivered == 0, "the dispatch was redelivered: no in-progress acks"

    run(main())
