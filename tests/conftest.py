import contextlib

import pytest

from listenerd import sources


@pytest.fixture
def scripted_source():
    """Replace a source type's run() for one test; the registry is restored afterwards."""
    registered: list[str] = []

    def use(source_type, run):
        sources.register(source_type, run)
        registered.append(source_type)

    yield use
    for source_type in registered:
        sources._EXTRA.pop(source_type, None)


@pytest.fixture
async def started():
    """`thing = await started(thing)`: enter a simulator, a `DaemonProcess`, an `Api`, a `Harness` (any async
    context manager) and leave it at teardown, last in first out, so a failing assertion still stops it."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack.enter_async_context
