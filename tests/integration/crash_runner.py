"""A minimal daemon for the kill -9 test: store, outbox, forwarder and supervisor with a scripted source.

Each listener's source emits numbered events `{"n": i}` (even numbers carry a source key, odd ones get
an id assigned at receipt), each with checkpoint `i`, and resumes after its stored checkpoint the
way a replaying provider (Salesforce) would. After every chunk is committed it appends
`<listener> <n>` lines to the ack file: the record of what the source side was told is safe.
SIGTERM stops it gracefully; SIGKILL is what the test sends.

    python -m tests.integration.crash_runner --db D --engine URL --acked FILE --total N [--listeners A,B]

The crash tests start it with `spawn()` and read the ack file with `read_acked()`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from listenerd import sources
from listenerd.delivery.forwarder import Forwarder
from listenerd.delivery.outbox import Outbox
from listenerd.model import Config
from listenerd.observability import Metrics, configure_logging
from listenerd.store import Store
from listenerd.supervisor import Supervisor
from tests.harness import desired, integration, listener, wait_for

ROOT = Path(__file__).resolve().parents[2]


async def spawn(db: Path, engine_url: str, acked_path: Path, total: int, listeners: tuple[str, ...],
                synchronous: str = "NORMAL") -> asyncio.subprocess.Process:
    """The runner as a child process; it prints `running` once its listeners are launched."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.crash_runner", "--db", str(db), "--engine", engine_url,
        "--acked", str(acked_path), "--total", str(total), "--listeners", ",".join(listeners),
        "--synchronous", synchronous, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


async def kill_under_load(runner: asyncio.subprocess.Process, acked_path: Path, engine: Any) -> None:
    """Once the runner says `running` and events flow (300 acknowledged to sources, 20 at the engine), kill -9."""
    assert (await asyncio.wait_for(runner.stdout.readline(), 20)).strip() == b"running"  # type: ignore[union-attr]
    await wait_for(lambda: len(read_acked(acked_path)) >= 300 and len(engine.received) >= 20, timeout=20,
                   what="events flowing before the kill")
    runner.send_signal(signal.SIGKILL)
    await runner.wait()


async def drain_after_restart(runner: asyncio.subprocess.Process, engine: Any, want: set[tuple[str, int]]) -> None:
    """The restarted runner says `running`, the engine gets every wanted (listener, n), SIGTERM exits 0."""
    assert (await asyncio.wait_for(runner.stdout.readline(), 20)).strip() == b"running"  # type: ignore[union-attr]
    await wait_for(lambda: {(e["listener-id"], e["event"]["n"]) for e in engine.received} >= want, timeout=30,
                   what="every event delivered after the restart")
    runner.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(runner.wait(), 20) == 0


async def reap(runner: asyncio.subprocess.Process) -> None:
    """Kill a runner a failed test left running."""
    if runner.returncode is None:
        runner.kill()
        await runner.wait()


def read_acked(path: Path) -> set[tuple[str, int]]:
    """(listener, n) of every event the runner's sources were told is committed (a torn last line is skipped)."""
    if not path.exists():
        return set()
    lines = path.read_text().splitlines()
    return {(lid, int(n)) for lid, n in (line.split() for line in lines if line.count(" ") == 1)}


def scripted(total: int, acked_path: str, chunk: int):
    acked = open(acked_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    async def run(ctx) -> None:
        checkpoint = await ctx.checkpoint()
        n = int(checkpoint) + 1 if checkpoint is not None else 0
        ctx.started(f"Subscribed to channel: {ctx.listener_id}")
        while n < total:
            numbers = range(n, min(n + chunk, total))
            for i in numbers:
                await ctx.emit({"n": i}, key=str(i) if i % 2 == 0 else None, checkpoint=str(i))
            await ctx.flush()  # committed: now the source side may be told
            acked.write("".join(f"{ctx.listener_id} {i}\n" for i in numbers))
            acked.flush()
            n = numbers[-1] + 1
            await asyncio.sleep(0.002)
        await asyncio.Event().wait()

    return run


async def main(args: argparse.Namespace) -> None:
    config = Config.model_validate({
        "store": {"path": args.db, "synchronous": args.synchronous},
        "engine": {"url": args.engine, "batch-max": args.batch_max, "linger-ms": 5, "retry-initial": 0.05,
                   "retry-max": 0.5},
    })
    sources.register("pusher", scripted(args.total, args.acked, args.chunk))
    store = Store(config.store.path, config.store.synchronous)
    await store.open()
    metrics = Metrics()
    outbox = Outbox(store, max_events=config.store.outbox_max_events, max_bytes=config.store.outbox_max_bytes,
                    metrics=metrics)
    await outbox.start()
    supervisor = Supervisor(config, outbox, metrics)
    forwarder = Forwarder(config.engine, outbox, metrics, supervisor.forwarded)
    await forwarder.start()
    creds = integration("pusher", key="k", secret="runner-secret")
    await supervisor.start({("t", lid): desired(listener(id=lid, type="pusher", options={"channel": lid}), creds)
                            for lid in args.listeners.split(",")})
    print("running", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await supervisor.stop()
    await outbox.close()
    await forwarder.stop(5.0)
    await store.close()
    print("stopped", outbox.depth, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--acked", required=True)
    parser.add_argument("--total", type=int, required=True)
    parser.add_argument("--listeners", default="A,B")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--batch-max", type=int, default=20)
    parser.add_argument("--synchronous", default="NORMAL")
    configure_logging("json", "warning", sys.stderr)
    asyncio.run(main(parser.parse_args()))
