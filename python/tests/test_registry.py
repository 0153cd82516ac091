"""AgentRegistryClient against a real control plane: register, update, availability, search,
best fit, deregister, and errors by code."""

from __future__ import annotations

import uuid

import pytest

from omoi import (
    AgentRegistryClient,
    ConflictError,
    DeregisteredError,
    ForbiddenError,
    MalformedError,
    NoResponderError,
    NotFoundError,
    OmoiError,
    RequestTimeoutError,
    UnknownAgentError,
    ValidationError,
    agent_id,
)
from omoi._transport import request
from support import ControlPlane, run, unique


def test_agent_ids_derive_from_namespace_and_name() -> None:
    assert agent_id("omoi", "worker-1") == "52944496-d2fb-5894-be71-2d400c728d69"
    reg = AgentRegistryClient(namespace="fleet-a")
    assert reg.agent_id("w") == agent_id("fleet-a", "w")
    assert reg.agent_id("52944496-d2fb-5894-be71-2d400c728d69") == "52944496-d2fb-5894-be71-2d400c728d69"
    with pytest.raises(ValueError):
        AgentRegistryClient(namespace="Bad.NS")


def test_register_update_search_and_best_fit(plane: ControlPlane) -> None:
    async def main() -> None:
        async with plane.registry() as reg:
            cap = unique("cap")
            a, b = unique("reg-a"), unique("reg-b")
            ra = await reg.register(a, [cap, "Python", " python "], capacity=2, tags=["gpu"], executors=["echo"])
            assert ra["id"] == agent_id(plane.ns, a)
            assert ra["capabilities"] == sorted([cap, "python"])  # normalised
            assert ra["status"] == "idle" and ra["executors"] == ["echo"]
            rb = await reg.register(b, [cap], capacity=4, metadata={"team": "b"})
            assert rb["executors"] == ["*"] and rb["metadata"] == {"team": "b"}

            # Heartbeats keep them fresh candidates (with their load).
            await reg.heartbeat(a, 1)
            await reg.heartbeat(b, 0)
            found = await reg.search([cap])
            assert {m["agent"]["name"] for m in found} == {a, b}
            assert all(m["matched_capabilities"] == [cap] for m in found)
            assert found[0]["match_score"] >= found[1]["match_score"]
            # Only a has `python`; partial lets b in behind it.
            only_a = await reg.search([cap, "python"])
            assert [m["agent"]["name"] for m in only_a] == [a]
            partial = await reg.search([cap, "python"], partial=True)
            assert [m["agent"]["name"] for m in partial][:1] == [a]
            assert b in {m["agent"]["name"] for m in partial}
            assert len(await reg.search([cap], limit=1)) == 1
            # Executor filter: b offers any executor, a only echo.
            assert {m["agent"]["name"] for m in await reg.search([cap], executor="shell")} == {b}

            best = await reg.best_fit([cap, "python"])
            assert best["agent"]["name"] == a
            # Equal loads: the preferred tag decides.
            await reg.heartbeat(a, 0)
            await reg.heartbeat(b, 0)
            tagged = await reg.best_fit([cap], preferred_tags=["gpu"])
            assert tagged["agent"]["id"] == ra["id"]

            updated = await reg.update(b, capabilities=[cap, "python", "rust"], capacity=3, tags=["gpu"])
            assert updated["capabilities"] == sorted([cap, "python", "rust"])
            assert updated["capacity"] == 3
            await reg.heartbeat(a, 0)
            await reg.heartbeat(b, 0)
            both = await reg.search([cap, "python"])
            assert {m["agent"]["name"] for m in both} == {a, b}
            assert (await reg.best_fit([cap, "rust"]))["agent"]["name"] == b

            # The KV mirror has the record.
            mirrored = await reg.get(b)
            assert mirrored is not None and mirrored["capacity"] == 3
            assert any(r["name"] == a for r in await reg.list())

    run(main())


def test_availability_toggle_takes_an_agent_out_of_rotation(plane: ControlPlane) -> None:
    async def main() -> None:
        async with plane.registry() as reg:
            cap = unique("cap")
            name = unique("avail")
            await reg.register(name, [cap])
            off = await reg.set_availability(name, False)
            assert off["status"] == "maintenance"
            await reg.heartbeat(name, 0)  # heartbeats do not bring it back
            assert (await reg.get(name) or {})["status"] == "maintenance"
            assert await reg.search([cap]) == []
            with pytest.raises(NotFoundError) as e:
                await reg.best_fit([cap])
            assert e.value.code == "not_found" and e.value.status == 404
            again = await reg.unavailable(name)  # already out: unchanged
            assert again["status"] == "maintenance"
            on = await reg.set_availability(name, True)
            assert on["status"] == "idle"
            await reg.heartbeat(name, 0)
            assert [m["agent"]["name"] for m in await reg.search([cap])] == [name]
            same = await reg.available(name)
            assert same["status"] == "idle"

    run(main())


def test_errors_carry_codes(plane: ControlPlane) -> None:
    async def main() -> None:
        async with plane.registry() as reg:
            name = unique("err")
            await reg.register(name, ["x"])
            # A name held by a live agent.
            with pytest.raises(ConflictError) as conflict:
                await reg.register(name, ["x"])
            assert conflict.value.code == "conflict" and conflict.value.status == 409
            # The same process registering again (its reply lost) is answered with the agent.
            again = unique("retry")
            first = await reg.register(again, ["x"], instance="proc-1")
            assert await reg.register(again, ["x"], instance="proc-1") == first
            with pytest.raises(ConflictError):
                await reg.register(again, ["x"], instance="proc-2")
            # Validation, naming the field.
            with pytest.raises(ValidationError) as bad:
                await reg.register(unique("err"), ["x"], capacity=0)
            assert (bad.value.code, bad.value.field, bad.value.status) == ("validation", "capacity", 400)
            with pytest.raises(ValidationError) as bad_cap:
                await reg.register(unique("err"), ["not ok!"])
            assert bad_cap.value.field == "capabilities"
            with pytest.raises(ValidationError) as bad_name:
                await reg.register("has space " + uuid.uuid4().hex[:6], ["x"])
            assert bad_name.value.field == "name"
            with pytest.raises(ValidationError) as bad_limit:
                await reg.search(["x"], limit=0)
            assert bad_limit.value.field == "limit"
            # Acting as another agent than the subject's is forbidden.
            nc = await reg._conn.nc()
            other = agent_id(plane.ns, unique("someone"))
            with pytest.raises(ForbiddenError) as forbidden:
                await request(nc, f"{plane.ns}.act.{other}.register", {"name": name, "capabilities": []}, 5)
            assert forbidden.value.code == "forbidden" and forbidden.value.status == 403
            # Not a JSON object.
            with pytest.raises(MalformedError) as malformed:
                await request(nc, f"{plane.ns}.registry.search", b"[]", 5)
            assert malformed.value.code == "malformed"
            # Unknown agents.
            ghost = unique("ghost")
            with pytest.raises(UnknownAgentError) as unknown:
                await reg.heartbeat(ghost, 0)
            assert unknown.value.code == "unknown_agent" and unknown.value.status == 404
            with pytest.raises(NotFoundError):
                await reg.update(ghost, capacity=2)
            # An agent sets its own status only to maintenance or idle (an operator, over
            # HTTP, does the rest).
            await reg.update(name, status="maintenance")
            with pytest.raises(ForbiddenError):
                await reg.update(name, status="running")
            await reg.update(name, status="idle")
            # Every error is an OmoiError with a code to branch on.
            try:
                await reg.register(name, ["x"], capacity=-1)
            except OmoiError as e:
                assert e.code in ("validation", "conflict")
            else:
                raise AssertionError("expected an error")
        # No control plane in a namespace nobody serves.
        async with AgentRegistryClient(plane.nats_url, namespace=unique("nobody").replace("-", "")) as lonely:
            with pytest.raises(NoResponderError) as none:
                await lonely.search([])
            assert none.value.code == "no_responders" and none.value.status is None

    run(main())


def test_deregister(plane: ControlPlane) -> None:
    async def main() -> None:
        async with plane.registry() as reg:
            name = unique("dereg")
            rec = await reg.register(name, ["x"])
            try:
                gone = await reg.deregister(name)
            except (NoResponderError, RequestTimeoutError):
                pytest.skip(
                    f"{plane.bin} does not serve <ns>.act.<id>.deregister yet (no responder)"
                )
            assert gone["id"] == rec["id"] and gone["status"] == "terminated"
            assert await reg.get(name) is None
            with pytest.raises(DeregisteredError) as e:
                await reg.heartbeat(name, 0)
            assert e.value.code == "deregistered" and e.value.status == 410
            # The name is free again: registered again, it comes back under its id.
            back = await reg.register(name, ["x"])
            assert back["id"] == rec["id"] and back["status"] == "idle"

    run(main())
