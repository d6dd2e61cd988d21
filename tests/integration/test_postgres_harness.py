"""The test harness's own PostgreSQL fallback, forced once: a throwaway cluster from the installed
binaries (initdb + pg_ctl in a temporary directory, a free port, not as root), used and removed."""

import psycopg

from listenerd.testing_pg import Postgres, binaries


def test_the_throwaway_cluster_starts_serves_a_fresh_database_and_is_removed():
    assert binaries() is not None, "PostgreSQL's binaries must be installed (.ci/run installs Debian's postgresql)"
    server = Postgres(mode="throwaway").start()
    try:
        directory = server.throwaway
        assert directory is not None and server.port != 5432
        url = server.database()
        with psycopg.connect(url, autocommit=True) as conn:
            name = url.rsplit("/")[-1]
            assert conn.execute("SELECT current_user, current_database()").fetchone() == ("postgres", name)
            assert conn.execute("SHOW port").fetchone()[0] == str(server.port)
        server.drop(url)
    finally:
        server.stop()
    assert not directory.exists()
