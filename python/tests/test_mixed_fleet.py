"""Mixed fleets: Python agents and `omoi worker` processes contend for the same lock, hand
tasks to each other, and run the steps of one workflow."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Optional

from omoi import Agent, HandOff, InboxItem, LockManager, Task, agent_id
from omoi._transport import request
from support import ControlPlane, eventually, run, unique, wait_status


def _line(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def test_a_python_agent_and_an_omoi_worker_share_one_exclusive_lock(plane: ControlPlane, tmp_path: Path) -> None:
    cap = unique("mixlock")
    resource = f"repo:{unique('shared')}"
    log = tmp_path / "runs.log"
    log.touch()
    worker = unique("mix-w")
    plane.spawn_worker(worker, [cap], capacity=1)
    # The shell task records its start, its fencing token (OMOI_LOCK_TOKENS) and its end.
    command = (
        f'echo "S|$(date +%s%N)|$OMOI_TASK_ID|w|$OMOI_LOCK_TOKENS" >> {log}; '
        f'sleep 0.15; echo "E|$(date +%s%N)|$OMOI_TASK_ID|w|" >> {log}; echo "{{}}"'
    )

    async def handle(task: Task) -> dict[str, Any]:
        # The Python agent takes the same shell tasks (it offers every executor) and records
        # the same way, with the token the SDK got for it.
        _line(log, f"S|{time.time_ns()}|{task.task_id}|p|{json.dumps(task.lock_tokens, separators=(',', ':'))}")
        await asyncio.sleep(0.15)
        _line(log, f"E|{time.time_ns()}|{task.task_id}|p|")
        return {}

    async def main() -> None:
        await wait_status(plane, worker, ("idle",))
        agent = Agent(plane.nats_url, name=unique("mix-p"), capabilities=[cap], namespace=plane.ns, handler=handle,
                      lock_wait=30.0)
        async with agent, plane.workflows() as wf:
            tasks = [
                {
                    "key": f"t{i:02d}",
                    "capabilities": [cap],
                    "executor": "shell",
                    "input": {"command": command},
                    "resources": [{"name": resource, "mode": "exclusive"}],
                }
                for i in range(14)
            ]
            sub = await wf.submit({"name": "mixlock", "tasks": tasks})
            # Watch the lock while they run: a holder of one kind with the other queued.
            js = await wf._conn.js()
            locks = LockManager(await js.key_value(f"{plane.ns}_locks"))
            waiting = asyncio.create_task(wf.wait(sub["workflow_id"], timeout=150))
            contended = 0
            while not waiting.done():
                state = await locks.read(resource)
                now = time.time() * 1000
                if state.live_holders(now) and state.live_waiters(now):
                    contended += 1
                await asyncio.sleep(0.02)
            view = waiting.result()
        assert view["status"] == "completed", view
        runs: dict[str, dict[str, Any]] = {}
        for line in log.read_text().splitlines():
            kind, ts, task_id, who, tokens = line.split("|", 4)
            run_ = runs.setdefault(task_id, {"who": who})
            if kind == "S":
                run_["start"] = int(ts)
                run_["token"] = json.loads(tokens)[resource]
            else:
                run_["end"] = int(ts)
        assert len(runs) == 14, runs
        ordered = sorted(runs.values(), key=lambda r: r["start"])
        for first, second in zip(ordered, ordered[1:]):
            assert first["end"] <= second["start"], f"overlapping holders: {first} {second}"
            assert second["token"] > first["token"], f"fencing tokens must grow: {first} {second}"
        assert {r["who"] for r in ordered} == {"w", "p"}, "both kinds of agent must have run tasks"
        assert contended > 0, "the two agents never waited for each other"
        by_agent = {t["agent_id"] for t in view["tasks"]}
        assert by_agent == {agent.id, agent_id(plane.ns, worker)}

    run(main())


def test_handoffs_between_a_python_agent_and_an_omoi_worker(plane: ControlPlane, tmp_path: Path) -> None:
    py_cap, w_cap = unique("ho-py"), unique("ho-w")
    inbox_dir = tmp_path
    worker = unique("ho-w")
    worker_id = agent_id(plane.ns, worker)
    plane.spawn_worker(worker, [w_cap], capacity=2, OMOI_WORKER_INBOX_DIR=str(inbox_dir))
    py_name = unique("ho-p")
    py_id = agent_id(plane.ns, py_name)
    offers: list[InboxItem] = []

    async def handle(task: Task) -> dict[str, Any]:
        if task.key == "to-worker":
            # A Python handler gives its task to the omoi worker's agent.
            raise HandOff(to_agent_id=worker_id, reason="the worker should echo it", context={"from": "python"})
        return {"by": "python", "handoff": task.handoff}

    async def main() -> None:
        await wait_status(plane, worker, ("idle",))

        async def on_inbox(item: InboxItem) -> None:
            if item.kind == "handoff_offer":
                offers.append(item)
                await agent.accept_handoff(item.handoff_id)

        agent = Agent(plane.nats_url, name=py_name, capabilities=[py_cap], namespace=plane.ns, handler=handle,
                      on_inbox=on_inbox)
        # The shell task asks (exit 75) to hand itself to the Python agent.
        ask = json.dumps({"handoff": {"to_agent_id": py_id, "reason": "python, please", "context": {"from": "shell"}}})
        async with agent, plane.workflows() as wf:
            sub = await wf.submit(
                {
                    "name": "handoffs",
                    "tasks": [
                        {"key": "to-worker", "capabilities": [py_cap], "input": {"x": 1}},
                        {"key": "from-worker", "capabilities": [w_cap], "executor": "shell",
                         "input": {"command": f"echo '{ask}'; exit 75"}},
                    ],
                }
            )
            # The worker got the offer in its inbox (it writes it to <dir>/<name>.jsonl): it
            # does not decide by itself, so accept on its behalf, acting as it.
            offer = await eventually(lambda: _offer(inbox_dir / f"{worker}.jsonl"), "the worker's handoff offer", 60)
            assert offer["from_agent_id"] == py_id and offer["task_id"] == sub["tasks"]["to-worker"]
            nc = await wf._conn.nc()
            accepted = await request(nc, f"{plane.ns}.act.{worker_id}.accept", {"v": 1, "handoff_id": offer["handoff_id"]}, 10)
            assert accepted["status"] == "accepted" and accepted["decided_by"] == worker_id
            view = await wf.wait(sub["workflow_id"], timeout=120)
        assert view["status"] == "completed", view
        tasks = {t["key"]: t for t in view["tasks"]}
        to_worker = tasks["to-worker"]
        assert to_worker["agent_id"] == worker_id
        assert to_worker["output"]["agent"] == worker  # the echo executor of omoi worker
        assert to_worker["output"]["input"]["handoff"]["from_agent_id"] == py_id
        assert to_worker["output"]["input"]["handoff"]["context"] == {"from": "python"}
        from_worker = tasks["from-worker"]
        assert from_worker["agent_id"] == py_id and from_worker["output"]["by"] == "python"
        assert from_worker["output"]["handoff"]["from_agent_id"] == worker_id
        assert from_worker["output"]["handoff"]["context"] == {"from": "shell"}
        assert [o.from_agent_id for o in offers] == [worker_id]

    run(main())


async def _offer(path: Path) -> Optional[dict[str, Any]]:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if item.get("kind") == "handoff_offer":
            return item  # type: ignore[no-any-return]
    return None


def test_one_workflow_whose_steps_run_on_both(plane: ControlPlane) -> None:
    py_cap, w_cap = unique("both-py"), unique("both-w")
    worker = unique("both-w")
    worker_id = agent_id(plane.ns, worker)
    plane.spawn_worker(worker, [w_cap], capacity=2)

    async def handle(task: Task) -> dict[str, Any]:
        return {"step": task.key, "deps": sorted(task.dependencies), "seen": task.dependencies}

    async def main() -> None:
        await wait_status(plane, worker, ("idle",))
        agent = Agent(plane.nats_url, name=unique("both-p"), capabilities=[py_cap], namespace=plane.ns, handler=handle)
        async with agent, plane.workflows() as wf:
            spec = {
                "name": "both",
                "tasks": [
                    {"key": "plan", "capabilities": [py_cap], "input": {"goal": "ship"}},
                    {"key": "build", "capabilities": [w_cap], "executor": "echo", "depends_on": ["plan"],
                     "input": {"echo_dependencies": True, "goal": "${deps.plan.output.step}"}},
                    {"key": "sleepy", "capabilities": [w_cap], "executor": "sleep", "depends_on": ["plan"],
                     "input": {"ms": 50, "output": {"slept": True}}},
                    {"key": "report", "capabilities": [py_cap], "depends_on": ["build", "sleepy"]},
                ],
            }
            sub = await wf.submit(spec)
            view = await wf.wait(sub["workflow_id"], timeout=120)
        assert view["status"] == "completed", view
        tasks = {t["key"]: t for t in view["tasks"]}
        assert tasks["plan"]["agent_id"] == agent.id and tasks["report"]["agent_id"] == agent.id
        assert tasks["build"]["agent_id"] == worker_id and tasks["sleepy"]["agent_id"] == worker_id
        build = tasks["build"]["output"]
        assert build["agent"] == worker and build["input"]["goal"] == "plan"
        assert build["dependencies"]["plan"]["step"] == "plan"
        report = tasks["report"]["output"]
        assert report["deps"] == ["build", "sleepy"]
        assert report["seen"]["sleepy"] == {"slept": True} and report["seen"]["build"]["agent"] == worker

    run(main())
