"""The README's example agent, run as written: it takes a task, reads a message, and stops on
SIGTERM."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from omoi import Agent, Task, agent_id
from support import PYTHON_DIR, ControlPlane, eventually, run, unique, wait_status


def readme_example() -> str:
    text = (PYTHON_DIR / "README.md").read_text()
    match = re.search(r"<!-- example:agent.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README has no example agent"
    return match.group(1)


def test_the_projects_readme_shows_the_same_agent() -> None:
    text = (PYTHON_DIR.parent / "README.md").read_text()
    match = re.search(r"## Agents in Python\n.*?```python\n(.*?)```", text, re.S)
    assert match, "the project's README has no Python agent"
    assert match.group(1) == readme_example(), "README.md and python/README.md differ"


def test_the_readme_agent_runs(plane: ControlPlane, tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 40
    script = tmp_path / "summarizer.py"
    script.write_text(code)
    # The example reads its NATS server and namespace from the environment.
    proc = plane.spawn_python(script, env_extra={"OMOI_NATS_URL": plane.nats_url, "OMOI_NAMESPACE": plane.ns})

    async def quiet(task: Task) -> dict[str, Any]:
        return {}

    async def main() -> None:
        await wait_status(plane, "summarizer-1", ("idle", "running"))
        async with plane.workflows() as wf:
            text = "omoi coordinates a fleet of agents over NATS JetStream and PostgreSQL " * 3
            sub = await wf.submit({
                "name": "readme",
                "tasks": [{"key": "sum", "capabilities": ["summarize"], "input": {"text": text},
                           "resources": [{"name": "repo:docs", "mode": "exclusive"}], "timeout_seconds": 60}],
            })
            view = await wf.wait(sub["workflow_id"], timeout=90)
        assert view["status"] == "completed", proc.output()
        out = view["tasks"][0]["output"]
        assert out["words"] == 33 and out["summary"].startswith("omoi coordinates a fleet")
        assert "holding repo:docs with fencing token" in proc.output()

        sender = Agent(plane.nats_url, name=unique("readme-peer"), capabilities=[unique("x")], namespace=plane.ns,
                       handler=quiet)
        async with sender:
            thread = await sender.thread(["summarizer-1"])
            msg = await sender.send(thread["id"], "hello summarizer")

            async def read_by_it() -> bool:
                return "message from" in proc.output() and "hello summarizer" in proc.output()

            await eventually(read_by_it, "the example to print the message", 60)
            summarizer = agent_id(plane.ns, "summarizer-1")

            async def marked() -> bool:
                # Reading it again as the sender shows who read it.
                m = await sender.read(msg["id"])
                return summarizer in m["read_by"]

            await eventually(marked, "the example to mark the message read", 60)

        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(60) == 0, proc.output()
        assert await wait_status(plane, "summarizer-1", ("offline",), 10) == "offline"

    run(main())
