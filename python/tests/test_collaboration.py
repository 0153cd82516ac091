"""Inboxes, messages and handoffs between Python agents."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from omoi import Agent, ConflictError, ForbiddenError, HandOff, InboxItem, Task
from support import ControlPlane, eventually, run, unique


async def never(task: Task) -> dict[str, Any]:
    raise AssertionError("no task expected")


def test_messages_reach_inboxes_in_order_and_are_marked_read(plane: ControlPlane) -> None:
    got_b: list[InboxItem] = []

    async def on_b(item: InboxItem) -> None:
        got_b.append(item)

    async def main() -> None:
        a = Agent(plane.nats_url, name=unique("talk-a"), capabilities=[unique("c")], namespace=plane.ns, handler=never)
        b = Agent(plane.nats_url, name=unique("talk-b"), capabilities=[unique("c")], namespace=plane.ns, handler=never,
                  on_inbox=on_b)
        async with a, b:
            thread = await a.thread([b.name], thread_type="consultation", title="a question")
            assert set(thread["participants"]) == {a.id, b.id}
            m1 = await a.send(thread["id"], "first", recipient_id=b.name, metadata={"n": 1})
            m2 = await a.send(thread["id"], "second")
            assert m1["sender_id"] == a.id and m1["recipient_id"] == b.id

            await eventually(lambda: _count(got_b, 2), "b's inbox callback to see both messages", 60)
            assert [i.kind for i in got_b] == ["message", "message"]
            assert [i.content for i in got_b] == ["first", "second"]
            assert got_b[0].message_id == m1["id"] and got_b[0].metadata == {"n": 1}
            assert got_b[1].thread_id == thread["id"] and got_b[1].sender_id == a.id
            read = await b.read(m1["id"])
            assert b.id in read["read_by"]

            # b answers; a reads its inbox as an async iterator (durable: it was not listening).
            await b.send(thread["id"], "an answer", recipient_id=a.id)
            items = []
            async with contextlib.aclosing(a.inbox(idle_timeout=30)) as inbox:
                async for item in inbox:
                    items.append(item)
                    break
            assert items[0].kind == "message" and items[0].content == "an answer"
            assert items[0].sender_id == b.id
            # An item left unacked when the loop stops early is nak'ed: it comes again
            # (unless acked explicitly, as here).
            again = []
            async with contextlib.aclosing(a.inbox(idle_timeout=30)) as inbox:
                async for item in inbox:
                    again.append(item)
                    await item.ack()
                    break
            assert again[0].message_id == items[0].message_id
            nothing = [i async for i in a.inbox(idle_timeout=1.5)]
            assert nothing == []

            # Acting as someone else is forbidden.
            with pytest.raises(ForbiddenError):
                await a._act("send", {"thread_id": thread["id"], "sender_id": b.id, "content": "forged"})

            # The thread's history, page by page, newest first; then a participant closes it.
            page = await a.messages(thread["id"], limit=2)
            assert [m["content"] for m in page["messages"]] == ["an answer", "second"]
            older = await a.messages(thread["id"], before=page["next_cursor"])
            assert [m["content"] for m in older["messages"]] == ["first"]
            assert older["next_cursor"] is None
            unread = await b.messages(thread["id"], unread=True)
            assert [m["content"] for m in unread["messages"]] == ["second"]  # b read "first"
            closed = await b.close_thread(thread["id"], "abandoned")
            assert closed["status"] == "abandoned"

    run(main())


async def _count(items: list[Any], n: int) -> bool:
    return len(items) >= n


def test_a_handler_hands_its_task_to_another_agent_who_accepts(plane: ControlPlane) -> None:
    cap = unique("handoff")
    ran: list[tuple[str, int]] = []

    async def main() -> None:
        b_name = unique("ho-b")

        async def handle_a(task: Task) -> dict[str, Any]:
            ran.append(("a", task.attempt))
            raise HandOff(to_agent=b_name, reason="b knows this", context={"hint": 42})

        async def handle_b(task: Task) -> dict[str, Any]:
            ran.append(("b", task.attempt))
            return {"by": "b", "handoff": task.handoff}

        offers: list[InboxItem] = []

        async def on_b(item: InboxItem) -> None:
            if item.kind == "handoff_offer":
                offers.append(item)
                accepted = await b.accept_handoff(item.handoff_id)
                assert accepted["status"] == "accepted"

        a = Agent(plane.nats_url, name=unique("ho-a"), capabilities=[cap], namespace=plane.ns, handler=handle_a)
        b = Agent(plane.nats_url, name=b_name, capabilities=[unique("other")], namespace=plane.ns,
                  handler=handle_b, on_inbox=on_b)
        async with a, b, plane.workflows() as wf:
            sub = await wf.submit({"name": "handoff", "tasks": [{"key": "job", "capabilities": [cap], "input": {"q": 1}}]})
            view = await wf.wait(sub["workflow_id"], timeout=90)
        assert view["status"] == "completed", view
        task = view["tasks"][0]
        assert task["agent_id"] == b.id and task["output"]["by"] == "b"
        handoff = task["output"]["handoff"]
        assert handoff["from_agent_id"] == a.id and handoff["reason"] == "b knows this"
        assert handoff["context"] == {"hint": 42}
        assert ran[0] == ("a", 1) and ran[-1][0] == "b" and ran[-1][1] > 1
        assert offers[0].from_agent_id == a.id and offers[0].task_id == task["id"]

    run(main())


def test_a_declined_handoff_goes_back_to_the_next_best_fit(plane: ControlPlane) -> None:
    cap = unique("decline")
    ran: list[int] = []
    decided: list[dict[str, Any]] = []

    async def main() -> None:
        b_name = unique("dec-b")

        async def handle_a(task: Task) -> dict[str, Any]:
            ran.append(task.attempt)
            if len(ran) == 1:
                return HandOff(to_agent=b_name, reason="try b")  # type: ignore[return-value]
            return {"by": "a", "attempt": task.attempt}

        async def on_b(item: InboxItem) -> None:
            if item.kind == "handoff_offer":
                decided.append(await b.decline_handoff(item.handoff_id, reason="busy"))

        a = Agent(plane.nats_url, name=unique("dec-a"), capabilities=[cap], namespace=plane.ns, handler=handle_a)
        b = Agent(plane.nats_url, name=b_name, capabilities=[unique("other")], namespace=plane.ns,
                  handler=never, on_inbox=on_b)
        async with a, b, plane.workflows() as wf:
            sub = await wf.submit({"name": "decline", "tasks": [{"key": "job", "capabilities": [cap]}]})
            view = await wf.wait(sub["workflow_id"], timeout=90)
            assert decided and decided[0]["status"] == "declined"
            assert decided[0]["decision_reason"] == "busy" and decided[0]["decided_by"] == b.id
            with pytest.raises(ConflictError):  # the first decision won
                await b.accept_handoff(decided[0]["id"])
        assert view["status"] == "completed"
        assert view["tasks"][0]["agent_id"] == a.id and view["tasks"][0]["output"]["by"] == "a"
        assert len(ran) == 2 and ran[1] > ran[0]

    run(main())


def test_a_handoff_request_can_be_cancelled_by_its_requester(plane: ControlPlane) -> None:
    cap = unique("hcancel")
    go = asyncio.Event()
    outcome: dict[str, Any] = {}

    async def main() -> None:
        other = Agent(plane.nats_url, name=unique("hc-b"), capabilities=[unique("x")], namespace=plane.ns, handler=never)

        async def handle(task: Task) -> dict[str, Any]:
            # Ask (without giving the task up), then withdraw the ask and finish the work.
            asked = await a.request_handoff(task.task_id, to_agent_id=other.id, reason="maybe")
            outcome["asked"] = asked
            outcome["cancelled"] = await a.cancel_handoff(asked["id"])
            with pytest.raises(ForbiddenError):
                await other.cancel_handoff(asked["id"])
            go.set()
            return {"done": True}

        a = Agent(plane.nats_url, name=unique("hc-a"), capabilities=[cap], namespace=plane.ns, handler=handle)
        async with a, other, plane.workflows() as wf:
            sub = await wf.submit({"name": "hcancel", "tasks": [{"key": "job", "capabilities": [cap]}]})
            view = await wf.wait(sub["workflow_id"], timeout=90)
        assert go.is_set()
        assert outcome["asked"]["status"] == "requested"
        assert outcome["cancelled"]["status"] == "cancelled"
        assert view["status"] == "completed" and view["tasks"][0]["agent_id"] == a.id

    run(main())
