"""`listenerd` with scripted sources in place of the real ones, for subprocess tests of the daemon itself.

Every source type is replaced by `ticking`: it reports `started`, then emits one numbered event per
`TICK_SECONDS` forever. The numbering restarts per process run; `$`-metadata carries the run.
"""

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from listenerd import sources  # noqa: E402
from listenerd.cli import main  # noqa: E402

TICK_SECONDS = float(os.environ.get("SCRIPTED_TICK", "0.02"))


async def ticking(ctx):
    options = ctx.listener.options.dump()
    ctx.started(f"Scripted stream: {sorted(options.items())}")
    n = 0
    while True:
        await ctx.emit({"n": n, "pid": os.getpid()}, meta={"$event": "tick"})
        n += 1
        await asyncio.sleep(TICK_SECONDS)


for source_type in ("datasift", "pusher", "salesforce"):
    sources.register(source_type, ticking)

if __name__ == "__main__":
    sys.exit(main())
