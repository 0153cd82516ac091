"""Agent running real workflows: dependencies, retries, timeouts, cancel, capacity, dead
letters and redeliveries."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta
from typing import Any

import nats

from omoi import Agent, Task
from support import ControlPlane, eventually, run, unique


def make_agent(plane: ControlPlane, name: str, capabilities: list[str], **kw: Any) -> Agent:
    return Agent(plane.nats_url, name=name, capabilities=capabilities, namespace=plane.ns, **kw)


def task_by_key(view: dict[str, Any], key: str) -> dict[str, Any]:
    return next(t for t in view["tasks"] if t["key"] == key)


def test_an_agent_runs_a_workflow_and_outputs_flow_through_dependencies(plane: ControlPlane) -> None:
    cap = unique("dag")
    seen: dict[str, Task] = {}

    async def handle(task: Task) -> dict[str, Any]:
        seen[task.key] = task
        if task.key == "a":
            await asyncio.sleep(0.01)
        n = int(task.input.get("n", 0))
        total = n + sum(int(d.get("total", 0)) for d in task.dependencies.values())
        return {"total": total, "key": task.key}

    async def main() -> None:
        agent = make_agent(plane, unique("dag-agent"), [cap], capacity=2, handler=handle)
        async with agent, plane.workflows() as wf:
            spec = {
                "name": "dag",
                "tasks": [
                    {"key": "a", "capabilities": [cap], "input": {"n": 1}},
                    {"key": "b", "capabilities": [cap], "input": {"n": 10}},
                    {
                        "key": "c",
                        "capabilities": [cap],
                        "depends_on": ["a", "b"],
                        "input": {"n": 100, "from_a": "${deps.a.output.total}"},
                    },
                ],
            }
            sub = await wf.submit(spec)
            assert set(sub["tasks"]) == {"a", "b", "c"} and sub["unschedulable"] == []
            view = await wf.wait(sub["workflow_id"], timeout=90)
        assert view["status"] == "completed", view
        c = task_by_key(view, "c")
        assert c["output"] == {"total": 111, "key": "c"}
        assert c["agent_id"] == agent.id and c["attempt"] == 1
        # The dispatch carried the dependencies' outputs and resolved the reference.
        assert seen["c"].dependencies == {"a": {"total": 1, "key": "a"}, "b": {"total": 10, "key": "b"}}
        assert seen["c"].input["from_a"] == 1
        assert seen["c"].workflow_id == sub["workflow_id"] and seen["c"].task_id == sub["tasks"]["c"]
        assert seen["a"].lock_tokens == {} and seen["a"].executor == "echo"
        # `a` ended before its `started` was due; its completion dated its start back.
        a = task_by_key(view, "a")
        ran = datetime.fromisoformat(a["finished_at"]) - datetime.fromisoformat(a["started_at"])
        assert ran >= timedelta(milliseconds=10), a

    run(main())


def test_a_failing_handler_is_retried_then_fails_for_good(plane: ControlPlane) -> None:
    cap = unique("retry")
    attempts: dict[str, list[int]] = {}

    async def handle(task: Task) -> dict[str, Any]:
        attempts.setdefault(task.key, []).append(task.attempt)
        if task.key == "flaky" and task.attempt < 3:
            raise RuntimeError(f"flaky failure at attempt {task.attempt}")
        if task.key == "broken":
            raise ValueError("always broken")
        return {"ok": task.attempt}

    async def main() -> None:
        agent = make_agent(plane, unique("retry-agent"), [cap], handler=handle)
        async with agent, plane.workflows() as wf:
            flaky = await wf.submit(
                {"name": "flaky", "tasks": [{"key": "flaky", "capabilities": [cap], "max_attempts": 3}]}
            )
            broken = await wf.submit(
                {"name": "broken", "tasks": [{"key": "broken", "capabilities": [cap], "max_attempts": 2}]}
            )
            v1 = await wf.wait(flaky["workflow_id"], timeout=90)
            v2 = await wf.wait(broken["workflow_id"], timeout=90)
        assert v1["status"] == "completed"
        t1 = task_by_key(v1, "flaky")
        assert t1["output"] == {"ok": 3} and t1["attempt"] == 3
        assert attempts["flaky"] == [1, 2, 3]
        assert v2["status"] == "failed"
        t2 = task_by_key(v2, "broken")
        assert t2["status"] == "failed" and "ValueError: always broken" in (t2["error"] or "")
        assert attempts["broken"] == [1, 2]

    run(main())


def test_timeout_cancels_the_handler_and_fails_the_attempt(plane: ControlPlane) -> None:
    cap = unique("timeout")
    cancelled = asyncio.Event()

    async def handle(task: Task) -> dict[str, Any]:
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    async def main() -> None:
        agent = make_agent(plane, unique("timeout-agent"), [cap], handler=handle)
        async with agent, plane.workflows() as wf:
            sub = await wf.submit(
                {
                    "name": "timeout",
                    "tasks": [{"key": "slow", "capabilities": [cap], "timeout_seconds": 1, "max_attempts": 1}],
                }
            )
            view = await wf.wait(sub["workflow_id"], timeout=90)
        assert view["status"] == "failed"
        t = task_by_key(view, "slow")
        assert t["status"] == "failed" and "timed out after 1 s" in t["error"]
        assert cancelled.is_set()

    run(main())


def test_cancelling_a_workflow_cancels_the_running_handler(plane: ControlPlane) -> None:
    cap = unique("cancel")
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handle(task: Task) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    async def main() -> None:
        agent = make_agent(plane, unique("cancel-agent"), [cap], handler=handle)
        async with agent, plane.workflows() as wf:
            sub = await wf.submit({"name": "cancel", "tasks": [{"key": "long", "capabilities": [cap]}]})
            await asyncio.wait_for(started.wait(), 60)
            await wf.cancel(sub["workflow_id"])
            await asyncio.wait_for(cancelled.wait(), 60)
            view = await wf.wait(sub["workflow_id"], timeout=60)
            await eventually(lambda: _idle(agent), "the agent to hold nothing", 30)
        assert view["status"] == "cancelled"
        assert task_by_key(view, "long")["status"] == "cancelled"

    run(main())


async def _idle(agent: Agent) -> bool:
    return agent.load == 0


def test_never_more_handlers_than_capacity(plane: ControlPlane) -> None:
    cap = unique("capacity")
    running = 0
    peak = 0
    loads: list[int] = []

    async def handle(task: Task) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.3)
        finally:
            running -= 1
        return {"i": task.input["i"]}

    async def main() -> None:
        agent = make_agent(plane, unique("cap-agent"), [cap], capacity=2, handler=handle)
        async with agent, plane.workflows() as wf, plane.registry() as reg:
            sub = await wf.submit(
                {"name": "capacity", "tasks": [{"key": f"t{i}", "capabilities": [cap], "input": {"i": i}} for i in range(8)]}
            )
            done = asyncio.create_task(wf.wait(sub["workflow_id"], timeout=120))
            while not done.done():
                rec = await reg.get(agent.name)
                if rec:
                    loads.append(int(rec["current_load"]))
                await asyncio.sleep(0.1)
            view = done.result()
        assert view["status"] == "completed"
        assert 1 <= peak <= 2, peak
        assert max(loads, default=0) <= 2

    run(main())


def test_bad_dispatches_are_dead_lettered_and_finished_attempts_not_rerun(plane: ControlPlane) -> None:
    cap = unique("dl")
    calls: list[tuple[str, int]] = []

    async def handle(task: Task) -> dict[str, Any]:
        calls.append((task.task_id, task.attempt))
        return {"ran": True}

    async def main() -> None:
        agent = make_agent(plane, unique("dl-agent"), [cap], handler=handle)
        async with agent, plane.workflows() as wf:
            sub = await wf.submit({"name": "dl", "tasks": [{"key": "once", "capabilities": [cap]}]})
            view = await wf.wait(sub["workflow_id"], timeout=60)
            assert view["status"] == "completed" and len(calls) == 1
            nc = await nats.connect(plane.nats_url)
            js = nc.jetstream()
            subject = f"{plane.ns}.dispatch.{agent.id}"
            task_id = sub["tasks"]["once"]
            base = {
                "v": 1,
                "task_id": task_id,
                "workflow_id": sub["workflow_id"],
                "key": "once",
                "attempt": 1,
                "agent_id": agent.id,
                "executor": "echo",
                "input": {},
            }
            # The same attempt again (as after a lost ack): acknowledged, not run.
            await js.publish(subject, json.dumps(base).encode())
            # An unsupported version, and a dispatch naming another agent: dead-lettered.
            await js.publish(subject, json.dumps({**base, "v": 2, "attempt": 7}).encode())
            other = "00000000-0000-5000-8000-000000000000"
            await js.publish(subject, json.dumps({**base, "agent_id": other, "attempt": 8}).encode())

            async def drained() -> bool:
                info = await js.consumer_info(f"{plane.ns}_dispatch", f"agent-{agent.id}")
                return info.num_pending == 0 and info.num_ack_pending == 0

            await eventually(drained, "the agent to settle the three dispatches", 60)
            dl_subject = f"{plane.ns}.deadletter.dispatch.{agent.id}"
            dl = await js.subscribe(dl_subject, stream=f"{plane.ns}_deadletter", ordered_consumer=True)
            reasons = []
            for _ in range(2):
                msg = await dl.next_msg(timeout=30)
                assert msg.headers is not None
                assert msg.headers["Omoi-Original-Subject"] == subject
                reasons.append(msg.headers["Omoi-Deadletter-Reason"])
                body = json.loads(msg.data)
                assert body["attempt"] in (7, 8)
            await dl.unsubscribe()
            await nc.close()
        assert calls == [(task_id, 1)]
        assert any("version" in r for r in reasons) and any(other in r for r in reasons), reasons

    run(main())


def _psql(plane: ControlPlane, sql: str) -> None:
    import subprocess

    subprocess.run(["psql", plane.database_url, "-q", "-c", sql], check=True, capture_output=True)


def test_an_agent_the_control_plane_forgot_registers_again_and_a_deregistered_one_stops(plane: ControlPlane) -> None:
    async def handle(task: Task) -> dict[str, Any]:
        return {}

    async def main() -> None:
        agent = make_agent(plane, unique("amnesia"), [unique("c")], handler=handle, heartbeat_interval=0.2)
        async with agent, plane.registry() as reg:
            first = await reg.get(agent.name)
            assert first is not None
            # The control plane loses the agent (as after a database restore): its next
            # heartbeat is answered unknown_agent, and it registers again under its id.
            _psql(plane, f"DELETE FROM agents WHERE id = '{agent.id}'")

            async def back() -> bool:
                rec = await reg.get(agent.name)
                return rec is not None and rec["created_at"] != first["created_at"]

            await eventually(back, "the agent to register again", 60)
            assert not agent.stopping
            # An operator deregisters it (terminated in the database): heartbeats are
            # answered `deregistered` and the agent stops hosting itself.
            _psql(plane, f"UPDATE agents SET status = 'terminated' WHERE id = '{agent.id}'")
            await asyncio.wait_for(agent.wait_closed(), 60)
            assert agent.deregistered

    run(main())


def test_stop_lets_running_handlers_finish_within_the_grace_period(plane: ControlPlane) -> None:
    cap = unique("grace")
    started = asyncio.Event()

    async def handle(task: Task) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(0.5)
        return {"finished": True}

    async def main() -> None:
        agent = make_agent(plane, unique("grace-agent"), [cap], handler=handle, shutdown_grace=30.0)
        async with plane.workflows() as wf:
            await agent.start()
            sub = await wf.submit({"name": "grace", "tasks": [{"key": "g", "capabilities": [cap]}]})
            await asyncio.wait_for(started.wait(), 60)
            agent.stop()
            await asyncio.wait_for(agent.wait_closed(), 60)
            view = await wf.wait(sub["workflow_id"], timeout=60)
        assert view["status"] == "completed"
        assert view["tasks"][0]["output"] == {"finished": True} and view["tasks"][0]["attempt"] == 1
        assert await _status(plane, agent.name) == "offline"

    run(main())


async def _status(plane: ControlPlane, name: str) -> Any:
    async with plane.registry() as reg:
        rec = await reg.get(name)
        return rec and rec["status"]
