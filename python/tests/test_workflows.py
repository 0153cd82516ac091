"""WorkflowClient: events in order, large submissions through the uploads object store,
patterns, cancel, errors."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from omoi import Agent, ConflictError, NotFoundError, Task, ValidationError
from support import ControlPlane, run, unique


def test_events_of_a_workflow_stream_in_commit_order(plane: ControlPlane) -> None:
    cap = unique("ev")

    async def handle(task: Task) -> dict[str, Any]:
        await asyncio.sleep(0.05)  # long enough to report `started`
        return {"key": task.key}

    async def main() -> None:
        agent = Agent(plane.nats_url, name=unique("ev-agent"), capabilities=[cap], namespace=plane.ns, handler=handle)
        async with agent, plane.workflows() as wf:
            spec = {
                "name": "events",
                "tasks": [
                    {"key": "a", "capabilities": [cap]},
                    {"key": "b", "capabilities": [cap], "depends_on": ["a"]},
                    {"key": "c", "capabilities": [cap], "depends_on": ["b"]},
                ],
            }
            # Another workflow at the same time: its events must be filtered out.
            noise = await wf.submit({"name": "noise", "tasks": [{"key": "n", "capabilities": [cap]}]})
            sub = await wf.submit(spec)
            live: list[dict[str, Any]] = []

            async def follow() -> None:
                async for env in wf.events(sub["workflow_id"]):
                    live.append(env)

            follower = asyncio.create_task(follow())
            await wf.wait(sub["workflow_id"], timeout=90)
            await asyncio.wait_for(follower, 60)
            await wf.wait(noise["workflow_id"], timeout=90)
            # Read again after the end: the same history, from the stream.
            replay = [env async for env in wf.events(sub["workflow_id"])]
            only_done = [e async for e in wf.events(sub["workflow_id"], types=["task.completed"])]

        assert [e["id"] for e in live] == [e["id"] for e in replay]
        types = [e["type"] for e in live]
        assert types[0] == "workflow.created" and types[-1] == "workflow.completed"
        assert all(e["v"] == 1 and e["data"]["workflow_id"] == sub["workflow_id"] for e in live)
        ids = {v: k for k, v in sub["tasks"].items()}

        def at(kind: str, key: str) -> int:
            return next(i for i, e in enumerate(live) if e["type"] == kind and ids.get(e["data"].get("task_id")) == key)

        for key in "abc":
            assert at("task.assigned", key) < at("task.completed", key)
        assert at("task.completed", "a") < at("task.assigned", "b") < at("task.completed", "b") < at("task.assigned", "c")
        assert at("task.completed", "c") < len(live) - 1
        assert [ids[e["data"]["task_id"]] for e in only_done] == ["a", "b", "c"]

    run(main())


def test_a_large_submission_goes_through_the_uploads_object_store(plane: ControlPlane) -> None:
    cap = unique("big")
    blob = "x" * 40_000

    async def handle(task: Task) -> dict[str, Any]:
        return {"len": len(task.input["blob"])}

    async def main() -> None:
        agent = Agent(plane.nats_url, name=unique("big-agent"), capabilities=[cap], capacity=8, namespace=plane.ns,
                      handler=handle)
        async with agent, plane.workflows() as wf:
            spec = {"name": "big", "tasks": [{"key": f"t{i}", "capabilities": [cap], "input": {"blob": blob}} for i in range(30)]}
            limit = await wf.inline_limit()
            assert len(str(spec)) > limit, "the submission must be too large for one message"
            sub = await wf.submit(spec)
            assert len(sub["tasks"]) == 30
            view = await wf.wait(sub["workflow_id"], timeout=120)
            # The uploaded object was deleted once submitted.
            js = await wf._conn.js()
            store = await js.object_store(f"{plane.ns}_uploads")
            assert [o for o in (await _objects(store)) if not o.deleted] == []
            # A small one through the same path, and an unknown object.
            small = await wf.submit({"name": "small", "tasks": [{"key": "s", "capabilities": [cap], "input": {"blob": "y"}}]}, upload=True)
            await wf.wait(small["workflow_id"], timeout=60)
            with pytest.raises(NotFoundError):
                await wf._request("submit_upload", {"v": 1, "object": f"submit-{uuid.uuid4()}"})
        # Its tasks (1.2 MB of input) do not fit in one reply: counts instead.
        assert view["status"] == "completed"
        assert view.get("tasks_omitted") or len(view["tasks"]) in (0, 30)
        assert view["counts"].get("completed") == 30

    run(main())


async def _objects(store: Any) -> list[Any]:
    try:
        return list(await store.list(ignore_deletes=False))
    except Exception:  # noqa: BLE001 - an empty store answers "no objects"
        return []


PATTERN = """
name: py_pipeline
parameters:
  cap: {type: string}
  word: {type: string, default: hello}
steps:
  - key: first
    capabilities: ["${params.cap}"]
    input: {word: "${params.word}"}
  - key: second
    capabilities: ["${params.cap}"]
    input: {prev: "${steps.first.output}"}
"""


def test_patterns_run_by_source_and_by_name(plane: ControlPlane) -> None:
    cap = unique("pat")

    async def handle(task: Task) -> dict[str, Any]:
        return {"key": task.key, "input": task.input}

    async def main() -> None:
        agent = Agent(plane.nats_url, name=unique("pat-agent"), capabilities=[cap], capacity=3, namespace=plane.ns,
                      handler=handle)
        async with agent, plane.workflows() as wf:
            sub = await wf.run_pattern(source=PATTERN, params={"cap": cap, "word": "hi"})
            assert sub["pattern"] == "py_pipeline" and set(sub["tasks"]) == {"first", "second"}
            view = await wf.wait(sub["workflow_id"], timeout=90)
            assert view["status"] == "completed"
            second = next(t for t in view["tasks"] if t["key"] == "second")
            assert second["output"]["input"]["prev"] == {"key": "first", "input": {"word": "hi"}}

            voted = await wf.run_pattern("majority_vote", {"capabilities": [cap]})
            assert voted["pattern"] == "majority_vote"
            done = await wf.wait(voted["workflow_id"], timeout=120)
            assert done["status"] in ("completed", "failed")

            with pytest.raises(NotFoundError):
                await wf.run_pattern("no_such_pattern_" + uuid.uuid4().hex[:6])
            with pytest.raises(ValidationError) as bad:
                await wf.run_pattern(source=PATTERN, params={"nope": 1})
            assert bad.value.field == "params"
            with pytest.raises(ValueError):
                await wf.run_pattern("majority_vote", source=PATTERN)

    run(main())


def test_cancel_get_and_errors(plane: ControlPlane) -> None:
    async def main() -> None:
        async with plane.workflows() as wf:
            cap = unique("nobody-has-it")
            sub = await wf.submit({"name": "waits", "tasks": [{"key": "w", "capabilities": [cap]}]})
            assert sub["unschedulable"][0]["missing_capabilities"] == [cap]
            got = await wf.get(sub["workflow_id"])
            assert got["status"] == "running" and got["tasks"][0]["status"] == "ready"
            counts = await wf.get(sub["workflow_id"], include_tasks=False)
            assert counts["counts"] == {"ready": 1} or counts["counts"].get("ready") == 1
            with pytest.raises(TimeoutError):
                await wf.wait(sub["workflow_id"], timeout=1.5)
            cancelled = await wf.cancel(sub["workflow_id"])
            assert cancelled["status"] == "cancelled"
            assert (await wf.wait(sub["workflow_id"], timeout=30))["status"] == "cancelled"
            with pytest.raises(ConflictError):
                await wf.cancel(sub["workflow_id"])
            with pytest.raises(NotFoundError):
                await wf.get(str(uuid.uuid4()))
            with pytest.raises(ValidationError) as cycle:
                await wf.submit({
                    "name": "cycle",
                    "tasks": [{"key": "a", "depends_on": ["b"]}, {"key": "b", "depends_on": ["a"]}],
                })
            assert cycle.value.code == "validation" and cycle.value.field
            with pytest.raises(Exception) as unknown_field:
                await wf.submit({"name": "x", "tasks": [{"key": "a"}], "bogus": 1})
            assert getattr(unknown_field.value, "code", None) in ("malformed", "validation")

    run(main())
