"""Test support: a real control plane (``omoi coordinator``) in a namespace and database of
its own, ``omoi worker`` processes, and helpers to run coroutines and wait on conditions.

Environment:
- ``OMOI_BIN``: the omoi binary (default ``<repo>/target/debug/omoi`` if it exists, else
  ``omoi`` on PATH);
- ``OMOI_TEST_NATS_URL``: the NATS server (default ``nats://127.0.0.1:4222``);
- ``OMOI_TEST_DATABASE_URL``: a PostgreSQL database used only to drop the test database
  (default ``postgres://postgres@127.0.0.1:5432/postgres``; the coordinator creates it).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

import nats
import nats.js.errors

PYTHON_DIR = Path(__file__).resolve().parent.parent
REPO = PYTHON_DIR.parent
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

from omoi import AgentRegistryClient, NotFoundError, OmoiError, WorkflowClient  # noqa: E402
from omoi._transport import request  # noqa: E402

T = TypeVar("T")


def omoi_bin() -> str:
    given = os.environ.get("OMOI_BIN")
    if given:
        return given
    built = REPO / "target" / "debug" / "omoi"
    if built.is_file() and os.access(built, os.X_OK):
        return str(built)
    found = shutil.which("omoi")
    if found:
        return found
    raise RuntimeError("no omoi binary: set OMOI_BIN, build target/debug/omoi, or put omoi on PATH")


def nats_url() -> str:
    return os.environ.get("OMOI_TEST_NATS_URL", "nats://127.0.0.1:4222")


def admin_database_url() -> str:
    return os.environ.get("OMOI_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def with_database(url: str, db: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def run(coro: Awaitable[T], timeout: float = 150.0) -> T:
    """Runs a test coroutine to its end (bounded: a hang fails the test, not the suite)."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def eventually(
    check: Callable[[], Awaitable[Optional[T]]],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.05,
) -> T:
    """Polls ``check`` until it returns something other than ``None``/``False``; fails with
    ``what`` after ``timeout`` (generous: the box may be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class Proc:
    """A child process whose output goes to a file (read with :meth:`output`)."""

    def __init__(self, args: list[str], env: dict[str, str], name: str, logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode

    async def wait_exit(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not exit within {timeout} s")
            await asyncio.sleep(0.05)
        return self.popen.returncode


STREAM_KEYS = ("events", "dispatch", "results", "inbox", "deadletter")
BUCKET_KEYS = ("agents", "locks", "leases")
OBJECT_KEYS = ("uploads",)


class ControlPlane:
    """``omoi coordinator`` in a fresh namespace and database."""

    def __init__(self) -> None:
        self.bin = omoi_bin()
        self.nats_url = nats_url()
        suffix = secrets.token_hex(5)
        self.ns = f"py{suffix}"
        self.db_name = f"omoi_py_{suffix}"
        self.database_url = with_database(admin_database_url(), self.db_name)
        self.admin_token = secrets.token_hex(16)  # 32 characters
        self.logdir = Path(tempfile.mkdtemp(prefix=f"omoi-{self.ns}-"))
        self.procs: list[Proc] = []
        self.coordinator: Optional[Proc] = None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of an omoi child process of this namespace (fast retries)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMOI_")}
        env.update(
            OMOI_NAMESPACE=self.ns,
            OMOI_NATS_URL=self.nats_url,
            OMOI_LOG_LEVEL="warn",
            OMOI_RETRY_BASE_DELAY_MS="100",
            OMOI_RETRY_MAX_DELAY_MS="1000",
        )
        env.update(extra)
        return env

    def start(self) -> None:
        env = self.env(
            OMOI_DATABASE_URL=self.database_url,
            OMOI_HTTP_ADDR="127.0.0.1:0",
            OMOI_BOOTSTRAP_ADMIN_TOKEN=self.admin_token,
        )
        self.coordinator = Proc([self.bin, "coordinator"], env, "coordinator", self.logdir)
        try:
            run(self._ready(), timeout=150)
        except BaseException:
            out = self.coordinator.output()
            self.stop()
            raise RuntimeError(f"control plane did not come up; its log:\n{out[-4000:]}")

    async def _ready(self) -> None:
        """Ready when its three services answer (a condition, not a sleep)."""
        nc = await nats.connect(self.nats_url)
        try:
            deadline = time.monotonic() + 140
            probe = str(uuid.uuid4())
            while True:
                assert self.coordinator is not None
                if self.coordinator.popen.poll() is not None:
                    raise RuntimeError("the coordinator exited")
                try:
                    await request(nc, f"{self.ns}.registry.search", {}, 2.0)
                    try:
                        await request(nc, f"{self.ns}.workflow.get", {"workflow_id": probe}, 2.0)
                    except NotFoundError:
                        pass
                    try:
                        await request(nc, f"{self.ns}.act.{probe}.read", {"message_id": probe}, 2.0)
                    except OmoiError as e:
                        if e.status is None:
                            raise
                    return
                except OmoiError as e:
                    if e.status is not None and e.code not in ("unavailable", "internal"):
                        raise
                if time.monotonic() > deadline:
                    raise RuntimeError("control plane not ready")
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def spawn_worker(
        self,
        name: str,
        capabilities: list[str],
        *,
        capacity: int = 1,
        executors: str = "echo,sleep,shell",
        **env: str,
    ) -> Proc:
        """``omoi worker`` hosting agent ``name``."""
        args = [
            self.bin,
            "worker",
            "--agent",
            name,
            "--capabilities",
            ",".join(capabilities),
            "--capacity",
            str(capacity),
            "--executors",
            executors,
        ]
        proc = Proc(args, self.env(OMOI_SHUTDOWN_GRACE_MS="3000", **env), f"worker-{name}", self.logdir)
        self.procs.append(proc)
        return proc

    def spawn_python(self, script: Path, *args: str, env_extra: Optional[dict[str, str]] = None) -> Proc:
        env = {k: v for k, v in os.environ.items()}
        env.update(env_extra or {})
        env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        proc = Proc([sys.executable, str(script), *args], env, f"py-{script.stem}", self.logdir)
        self.procs.append(proc)
        return proc

    def stop_children(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()

    def stop(self) -> None:
        self.stop_children()
        if self.coordinator is not None:
            self.coordinator.stop(timeout=20)
            self.coordinator = None
        try:
            run(self._delete_namespace(), timeout=60)
        except Exception as e:  # noqa: BLE001
            print(f"could not delete namespace {self.ns}: {e}", file=sys.stderr)
        subprocess.run(
            ["psql", admin_database_url(), "-q", "-c", f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.logdir, ignore_errors=True)

    async def _delete_namespace(self) -> None:
        """Deletes the namespace's streams, KV buckets and object stores (``<ns>_*``)."""
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            names = [f"{self.ns}_{k}" for k in STREAM_KEYS]
            names += [f"KV_{self.ns}_{k}" for k in BUCKET_KEYS]
            names += [f"OBJ_{self.ns}_{k}" for k in OBJECT_KEYS]
            for name in names:
                try:
                    await js.delete_stream(name)
                except nats.js.errors.NotFoundError:
                    pass
        finally:
            await nc.close()

    # Clients of this namespace (each test runs in its own event loop: make them there).
    def registry(self, nc: Any = None) -> AgentRegistryClient:
        return AgentRegistryClient(nc or self.nats_url, namespace=self.ns)

    def workflows(self, nc: Any = None) -> WorkflowClient:
        return WorkflowClient(nc or self.nats_url, namespace=self.ns)


async def agent_status(plane: ControlPlane, name: str) -> Optional[str]:
    reg = plane.registry()
    try:
        rec = await reg.get(name)
        return None if rec is None else str(rec["status"])
    finally:
        await reg.close()


async def wait_status(plane: ControlPlane, name: str, statuses: tuple[str, ...], timeout: float = 60.0) -> str:
    async def check() -> Optional[str]:
        st = await agent_status(plane, name)
        return st if st in statuses else None

    return await eventually(check, f"agent {name} to be {'/'.join(statuses)}", timeout, interval=0.1)


def dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True)
