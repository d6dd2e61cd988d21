"""cancel_and_wait: a task's end is swallowed, its error and the caller's own cancellation are not."""

import asyncio

import pytest

from listenerd.tasks import cancel_and_wait


async def test_the_tasks_cancellation_is_its_end_and_an_error_it_ends_with_is_raised():
    forever = asyncio.create_task(asyncio.Event().wait())
    await cancel_and_wait(forever)
    assert forever.cancelled()

    async def fails_on_the_way_out():
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("closing failed")

    failing = asyncio.create_task(fails_on_the_way_out())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closing failed"):
        await cancel_and_wait(failing)


async def test_a_caller_cancelled_while_it_waits_is_cancelled():
    closing = asyncio.Event()

    async def slow_to_end():
        try:
            await asyncio.Event().wait()
        finally:
            closing.set()
            await asyncio.sleep(0.5)

    slow = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(slow))
    await closing.wait()
    caller.cancel()
    await asyncio.wait([caller], timeout=5)
    assert caller.cancelled()
    await asyncio.wait([slow], timeout=5)
