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
