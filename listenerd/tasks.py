"""Ending asyncio tasks without swallowing the caller's own cancellation.

`task.cancel()` then `with suppress(CancelledError): await task` hides two different things behind one
exception: the task's end (wanted) and the caller being cancelled meanwhile (which must reach it). A caller
whose cancellation is swallowed runs on: a cluster round cancelled by a node's stop once went on handing
groups over and starting others, and the stop waited for it for good. `Task.cancelling()` tells them apart.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any], timeout: float | None = None) -> None:
    """Cancel `task` and wait until it ended (at most `timeout`: then TimeoutError). Its CancelledError is its
    end and is not raised; an error it ends with is; the caller's own cancellation meanwhile is raised again."""
    if task.done():
        return
    task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.CancelledError:
        caller = asyncio.current_task()
        if caller is not None and caller.cancelling():
            raise
