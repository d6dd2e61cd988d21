import contextlib
import os

import pytest

from listenerd import sources
from listenerd.testing import Tmpfs


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


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs at tmp_path/disk to fill and unfill (`listenerd.testing.Tmpfs`), unmounted at teardown.

    Skipped only where mounting is refused (not root); in CI (CI=true, run as root) a refusal fails."""
    why = Tmpfs.available()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must be able to mount a tmpfs for the disk-full tests: {why}")
        pytest.skip(why)
    with Tmpfs(tmp_path / "disk", size_mb=8) as disk:
        yield disk


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL for the session (`listenerd.testing_pg.Postgres`: the local one, else a throwaway
    cluster); never skipped: without one the tests that need it fail and say what to install."""
    from listenerd.testing_pg import Postgres

    with Postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres):
    """A fresh database of its own for one test, dropped afterwards."""
    url = postgres.database()
    yield url
    postgres.drop(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    """`make_store(**kwargs)`: an unopened `Store` of each backend (the test runs once per backend); the same
    database every time it is called within one test, so a test can close and reopen it."""
    from listenerd.store import Store
    from listenerd.store_pg import PostgresStore

    if request.param == "sqlite":
        return lambda **kw: Store(str(tmp_path / "store.db"), **kw)
    url = request.getfixturevalue("pg_url")
    return lambda **kw: PostgresStore(url, **kw)
