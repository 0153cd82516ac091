"""The SDK speaks the published contract: every message it sends (requests, reports, lock
values) and every message it reads (dispatches, inbox items, events, replies) validates
against docs/schemas/, captured from real traffic."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats

from omoi import Agent, HandOff, InboxItem, NoResponderError, NotFoundError, RequestTimeoutError, Task, lock_key
from schema import Index, validate
from support import ControlPlane, run, unique


def test_every_message_on_the_wire_matches_the_schemas(plane: ControlPlane) -> None:
    cap, b_cap = unique("wire"), unique("wire-b")
    resource = f"repo:{unique('wire')}"
    captured: list[tuple[str, bytes]] = []
    lock_values: list[bytes] = []
    no_deregister: list[bool] = []

    async def main() -> None:
        spy = await nats.connect(plane.nats_url)
        try:
            await scenario(spy)
        finally:
            await spy.close()

    async def scenario(spy: Any) -> None:
        async def keep(msg: Any) -> None:
            captured.append((msg.subject, msg.data))

        await spy.subscribe(f"{plane.ns}.>", cb=keep)
        await spy.flush()
        b_name = unique("wire-b")

        async def handle_a(task: Task) -> dict[str, Any]:
            if task.key == "locked":
                entry = await (await spy.jetstream().key_value(f"{plane.ns}_locks")).get(lock_key(resource))
                lock_values.append(entry.value)
                asked = await a.request_handoff(task.task_id, to_agent_id=b_name, reason="just asking")
                await a.cancel_handoff(asked["id"])
                return {"locked": task.lock_tokens}
            raise HandOff(to_agent=b_name, reason="b's job", context={"k": [1, 2]})

        async def handle_b(task: Task) -> dict[str, Any]:
            return {"from": (task.handoff or {}).get("from_agent_id")}

        async def on_b(item: InboxItem) -> None:
            if item.kind == "handoff_offer" and item.reason == "b's job":
                await b.accept_handoff(item.handoff_id)
            elif item.kind == "message":
                await b.read(item.message_id)

        a = Agent(plane.nats_url, name=unique("wire-a"), capabilities=[cap], namespace=plane.ns, handler=handle_a)
        b = Agent(plane.nats_url, name=b_name, capabilities=[b_cap], namespace=plane.ns, handler=handle_b,
                  on_inbox=on_b, executors=["echo", "LLM"])
        async with a, b, plane.workflows() as wf, plane.registry() as reg:
            thread = await a.thread([b.name], title="wire")
            await a.send(thread["id"], "hello", recipient_id=b.id, metadata={"x": 1})
            sub = await wf.submit({
                "name": "wire",
                "tasks": [
                    {"key": "locked", "capabilities": [cap], "resources": [{"name": resource}], "timeout_seconds": 60},
                    {"key": "moved", "capabilities": [cap], "depends_on": ["locked"], "input": {"p": "${deps.locked.output}"}},
                ],
            })
            await wf.wait(sub["workflow_id"], timeout=90)
            up = await wf.submit({"name": "up", "tasks": [{"key": "u", "capabilities": [unique("none")]}]}, upload=True)
            await wf.get(up["workflow_id"], include_tasks=False)
            await wf.cancel(up["workflow_id"])
            pat = await wf.run_pattern(source="name: p\nsteps:\n  - key: s\n    capabilities: [" + b_cap + "]\n    executor: llm\n")
            await wf.wait(pat["workflow_id"], timeout=90)

            r = unique("wire-r")
            await reg.register(r, ["x"], tags=["t"], metadata={"m": 1}, executors=["echo"])
            await reg.update(r, capacity=2, tags=["u"])
            await reg.set_availability(r, False)
            await reg.set_availability(r, True)
            await reg.heartbeat(r, 1)
            await reg.search(["x"], partial=True, limit=5, preferred_tags=["u"])
            await reg.best_fit(["x"])
            try:
                await reg.best_fit([unique("nobody")])
            except NotFoundError:
                pass
            await reg.heartbeat(r, 0, leaving=True)
            try:
                await reg.deregister(r)
            except (NoResponderError, RequestTimeoutError):
                no_deregister.append(True)  # a binary from before <ns>.act.<id>.deregister
        await spy.flush()
        await asyncio.sleep(0.5)

    run(main())

    index = Index(plane.ns)
    seen: set[str] = set()
    problems: list[str] = []
    for subject, data in captured:
        if subject.startswith(f"{plane.ns}.deadletter."):
            continue
        entry = index.entry(subject)
        assert entry is not None, f"no schema names subject {subject}"
        seen.add(entry["subject"])
        body = json.loads(data)
        for p in validate(body, entry["message"]):
            problems.append(f"{subject} ({entry['message']}): {p}")
    assert not problems, "\n".join(problems[:20])
    for v in lock_values:
        assert validate(json.loads(v), "LockState") == []
    expected = {
        f"<ns>.act.<agent_id>.{verb}"
        for verb in ("register", "update", "heartbeat", "deregister", "send", "read", "thread",
                     "handoff", "accept", "cancel")
    } | {f"<ns>.workflow.{v}" for v in ("submit", "submit_upload", "run", "get", "cancel")} | {
        "<ns>.registry.search",
        "<ns>.registry.best_fit",
        "<ns>.dispatch.<agent_id>",
        "<ns>.result.<agent_id>.<task_id>",
        "<ns>.agent.inbox.<agent_id>",
        "<ns>.<event type>",
    }
    if no_deregister:
        expected.discard("<ns>.act.<agent_id>.deregister")
    assert expected <= seen, f"not exercised: {sorted(expected - seen)}"


def test_replies_match_the_schemas(plane: ControlPlane) -> None:
    """What the SDK hands back is the documented reply (so its docs can point there)."""

    async def quiet(task: Task) -> dict[str, Any]:
        return {"ok": True}

    async def main() -> None:
        cap = unique("reply")
        async with plane.registry() as reg, plane.workflows() as wf:
            name = unique("reply-r")
            assert validate(await reg.register(name, [cap]), "AgentRecord") == []
            await reg.heartbeat(name, 0)
            assert validate(await reg.search([cap]), "AgentMatchList") == []
            assert validate(await reg.best_fit([cap]), "AgentMatch") == []
            assert validate(await reg.heartbeat(name, 0), "HeartbeatAck") == []
            agent = Agent(plane.nats_url, name=unique("reply-a"), capabilities=[cap], namespace=plane.ns, handler=quiet)
            async with agent:
                sub = await wf.submit({"name": "r", "tasks": [{"key": "k", "capabilities": [cap]}]})
                assert validate(sub, "Submitted") == []
                view = await wf.wait(sub["workflow_id"], timeout=90)
                assert validate(view, "WorkflowView") == []
                thread = await agent.thread([name])
                assert validate(thread, "Thread") == []
                assert validate(await agent.send(thread["id"], "hi"), "Message") == []
            try:
                assert validate(await reg.deregister(name), "AgentRecord") == []
            except (NoResponderError, RequestTimeoutError):
                pass  # a binary from before <ns>.act.<id>.deregister

    run(main())
