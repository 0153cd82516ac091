"""One real control plane for the session; each test stops the processes it started (and a
failing test shows their logs)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from support import ControlPlane


@pytest.fixture(scope="session")
def plane_session() -> Iterator[ControlPlane]:
    plane = ControlPlane()
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def plane(plane_session: ControlPlane, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    try:
        yield plane_session
    finally:
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed:
            for proc in plane_session.procs:
                print(f"---- {proc.name} (exit {proc.popen.poll()}):\n{proc.output()[-3000:]}")
            if plane_session.coordinator is not None:
                print(f"---- coordinator:\n{plane_session.coordinator.output()[-3000:]}")
        plane_session.stop_children()
