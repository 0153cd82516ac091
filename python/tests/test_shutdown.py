"""A Python agent process stopped by SIGTERM: its running task is handed back (released) and
completes on another agent; the agent is offline at once."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from omoi import Agent, Task
from support import ControlPlane, eventually, run, unique, wait_status

SCRIPT = Path(__file__).parent / "agent_proc.py"


def test_sigterm_releases_the_running_task_which_completes_elsewhere(plane: ControlPlane) -> None:
    cap = unique("term")
    name = unique("term-proc")
    proc = plane.spawn_python(SCRIPT, plane.nats_url, plane.ns, name, cap, "1.0")

    async def backup(task: Task) -> dict[str, Any]:
        return {"by": "backup", "attempt": task.attempt}

    async def main() -> None:
        await eventually(lambda: _has(proc, "registered"), "the agent process to register", 60)
        async with plane.workflows() as wf:
            sub = await wf.submit({"name": "term", "tasks": [{"key": "long", "capabilities": [cap], "max_attempts": 2}]})
            task_id = sub["tasks"]["long"]
            await eventually(lambda: _has(proc, f"started {task_id} 1"), "the process to start the task", 60)
            # Another agent that can take it over, started only now so the first dispatch
            # went to the process.
            other = Agent(plane.nats_url, name=unique("term-backup"), capabilities=[cap], namespace=plane.ns,
                          handler=backup)
            async with other:
                proc.signal(signal.SIGTERM)
                code = await proc.wait_exit(60)
                out = proc.output()
                assert code == 0, out
                assert f"cancelled {task_id}" in out and "exited" in out, out
                # It said goodbye: offline now, not after the silence timeout.
                assert await wait_status(plane, name, ("offline",), 5) == "offline"
                view = await wf.wait(sub["workflow_id"], timeout=90)
        assert view["status"] == "completed", view
        t = view["tasks"][0]
        assert t["agent_id"] == other.id and t["output"]["by"] == "backup"
        # Released, not failed: the hand-back did not count as a failure. (Attempt 2 may
        # still have been dispatched to the stopping process and reclaimed once it left.)
        assert t["attempt"] >= 2 and t["failures"] == 0

    run(main())


async def _has(proc: Any, line: str) -> bool:
    return line in proc.output()
