"""Loop and GC diagnostics for a benchmark's daemon: `PYTHONPATH=bench/loopdiag` and `LOOPDIAG_OUT=<file>`.

Imported by `site` at start-up of any Python process with this directory on its path. It records, with
`time.monotonic()` stamps (one clock for every process of the machine, so they line up with a client's):
- every event-loop callback that ran longer than `LOOPDIAG_SLOW_MS` (default 3), with what it was
  (the handle's repr: a task's name and coroutine, or the callback);
- every garbage collection: generation, duration, objects collected;
and writes them as JSON lines to `LOOPDIAG_OUT` when the process exits (and on `SIGUSR2`).
Off (nothing patched) without `LOOPDIAG_OUT`.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import threading
import time

OUT = os.environ.get("LOOPDIAG_OUT")

if OUT:
    import asyncio.events

    SLOW = float(os.environ.get("LOOPDIAG_SLOW_MS", "3")) / 1000
    records: list[dict] = []
    _clock = time.monotonic
    _run = asyncio.events.Handle._run

    running: list = [None, None]  # (start, stacks seen) of the callback running now, for the sampler
    main_thread = threading.get_ident()

    def _what(handle: asyncio.events.Handle) -> str:
        task = getattr(handle._callback, "__self__", None)
        if isinstance(task, asyncio.Task):
            coro = task.get_coro()
            return f"task {task.get_name()} {getattr(coro, '__qualname__', coro)}"
        return repr(handle)[:300]

    def _timed_run(self: asyncio.events.Handle) -> None:
        t0 = _clock()
        stacks: dict = {}
        running[0], running[1] = t0, stacks
        try:
            _run(self)
        finally:
            running[0] = None
            took = _clock() - t0
            if took >= SLOW:
                records.append({"kind": "slow", "at": t0, "ms": took * 1000, "what": _what(self),
                                "stacks": sorted(stacks.items(), key=lambda kv: -kv[1])[:4]})

    def _sampler() -> None:
        """While a callback runs past SLOW, where the loop's thread is, every SAMPLE seconds."""
        while True:
            time.sleep(SAMPLE)
            t0, stacks = running
            if t0 is None or _clock() - t0 < SLOW:
                continue
            frame = sys._current_frames().get(main_thread)
            where = []
            while frame is not None and len(where) < 14:
                code = frame.f_code
                where.append(f"{code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            if running[1] is stacks:
                key = " < ".join(where)
                stacks[key] = stacks.get(key, 0) + 1

    SAMPLE = float(os.environ.get("LOOPDIAG_SAMPLE_MS", "2")) / 1000
    threading.Thread(target=_sampler, daemon=True, name="loopdiag").start()

    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]

    _gc_start: list[float] = [0.0]

    def _gc(phase: str, info: dict) -> None:
        if phase == "start":
            _gc_start[0] = _clock()
        else:
            t0 = _gc_start[0]
            record = {"kind": "gc", "at": t0, "ms": (_clock() - t0) * 1000, "gen": info["generation"],
                      "collected": info["collected"]}
            if info["generation"] == 2:  # what it went through: every object but the frozen ones
                record["tracked"] = len(gc.get_objects())
                record["frozen"] = gc.get_freeze_count()
                if os.environ.get("LOOPDIAG_CENSUS"):  # what it walked, by type (the 30 most numerous)
                    census: dict[str, int] = {}
                    for obj in gc.get_objects():
                        name = type(obj).__module__ + "." + type(obj).__qualname__
                        census[name] = census.get(name, 0) + 1
                    record["census"] = sorted(census.items(), key=lambda kv: -kv[1])[:30]
            if gc.garbage:  # LOOPDIAG_SAVEALL: what the collection found unreachable, by type (then freed)
                kinds: dict[str, int] = {}
                for obj in gc.garbage:
                    name = type(obj).__module__ + "." + type(obj).__qualname__
                    kinds[name] = kinds.get(name, 0) + 1
                record["garbage"] = sorted(kinds.items(), key=lambda kv: -kv[1])[:25]
                gc.garbage.clear()
            records.append(record)

    gc.callbacks.append(_gc)
    if os.environ.get("LOOPDIAG_SAVEALL"):
        gc.set_debug(gc.DEBUG_SAVEALL)

    argv = " ".join(sys.argv)[:120] if hasattr(sys, "argv") else ""

    def _dump(*_: object) -> None:
        global argv
        argv = argv or " ".join(getattr(sys, "argv", []))[:120]
        with open(OUT, "a") as out:
            for record in records:
                out.write(json.dumps({"pid": os.getpid(), "argv": argv, **record}) + "\n")
        records.clear()

    atexit.register(_dump)
    signal.signal(signal.SIGUSR2, _dump)
