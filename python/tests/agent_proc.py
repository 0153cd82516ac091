"""A Python agent in a process of its own (for the shutdown test): runs until SIGTERM.

Usage: agent_proc.py NATS_URL NAMESPACE NAME CAPABILITY GRACE_SECONDS
Prints `registered`, `started <task_id> <attempt>`, `cancelled <task_id>` and `exited` lines.
"""

import asyncio
import sys

from omoi import Agent, Task


async def main() -> None:
    url, ns, name, capability, grace = sys.argv[1:6]
    agent = Agent(url, name=name, capabilities=[capability], namespace=ns, shutdown_grace=float(grace))

    @agent.handler
    async def handle(task: Task) -> dict:
        print(f"started {task.task_id} {task.attempt}", flush=True)
        try:
            await asyncio.sleep(float(task.input.get("secs", 600)))
        except asyncio.CancelledError:
            print(f"cancelled {task.task_id}", flush=True)
            raise
        return {"by": name}

    await agent.start()
    print("registered", flush=True)
    await agent.run()
    print("exited", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
