"""Which PostgreSQL driver for the store: psycopg 3 or asyncpg, on the outbox's own work.

One command: `python bench/pg_driver.py`. Each driver does the same rounds against a fresh database
(of `listenerd.testing_pg.Postgres`): a commit group (64 segments of 32 events of ~220 bytes, two
multi-row INSERTs and a checkpoint upsert in one transaction), a lease of what is waiting (the
segments JOIN bodies read) and an ack (DELETE by seq list), and prints durable events per second.
psycopg runs as the store runs it (synchronously on one dedicated thread, the event loop handing it
calls); asyncpg runs on the event loop, as it must. Each round's commit waits for the WAL flush.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from listenerd.delivery.segments import checksum, segment_row
from listenerd.schema import STORE_MIGRATIONS, statements
from listenerd.testing_pg import Postgres

SEGMENTS, EVENTS, SECONDS = 64, 32, 4.0
BODY = b'{"id":"x","tenant-id":"t","listener-id":"L","source":"pusher","event":{"data":"' + b"x" * 130 + b'"}}'


def rows() -> list:
    return [segment_row("t", f"L{i}", time.time(), [BODY] * EVENTS) for i in range(SEGMENTS)]


def schema_sql() -> list[str]:
    return [s for m in STORE_MIGRATIONS for s in statements(m.postgresql)]


def bench_psycopg(url: str) -> float:
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    for statement in schema_sql():
        conn.execute(statement)
    seg_sql = "INSERT INTO outbox_segments (seq, tenant_id, listener_id, received_at, total, events, size) VALUES " \
        + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * SEGMENTS)
    body_sql = "INSERT INTO outbox_bodies (seq, ends, bodies, checksum) VALUES " \
        + ", ".join(["(%s, %s, %s, %s)"] * SEGMENTS)
    executor = ThreadPoolExecutor(1)

    def round_trip() -> int:
        batch = rows()
        with conn.transaction():
            seqs = [r[0] for r in conn.execute("SELECT nextval(pg_get_serial_sequence('outbox_segments', 'seq')) "
                                               "FROM generate_series(1, %s)", (SEGMENTS,)).fetchall()]
            conn.execute(seg_sql, [v for s, r in zip(seqs, batch, strict=True) for v in (s, r[0], r[1], r[2], r[3],
                                                                                           r[3], r[4])])
            conn.execute(body_sql, [v for s, r in zip(seqs, batch, strict=True)
                                    for v in (s, r[5], r[6], checksum(r[5], r[6]))])
            conn.execute("INSERT INTO checkpoints (tenant_id, listener_id, value, updated_at) VALUES ('t', 'L0', "
                         "%s, 0) ON CONFLICT (tenant_id, listener_id) DO UPDATE SET value = excluded.value",
                         (str(seqs[0]),))
        leased = conn.execute("SELECT s.seq, bodies FROM outbox_segments s JOIN outbox_bodies b ON b.seq = s.seq "
                              "ORDER BY s.seq").fetchall()
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            conn.execute("DELETE FROM outbox_segments WHERE seq = ANY(%s)", ([r[0] for r in leased],))
            conn.execute("DELETE FROM outbox_bodies WHERE seq = ANY(%s)", ([r[0] for r in leased],))
        return SEGMENTS * EVENTS

    async def run() -> float:
        loop = asyncio.get_running_loop()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            done += await loop.run_in_executor(executor, round_trip)
        return done / (time.perf_counter() - start)

    try:
        return asyncio.run(run())
    finally:
        executor.shutdown()
        conn.close()


def bench_asyncpg(url: str) -> float:
    import asyncpg

    async def run() -> float:
        conn = await asyncpg.connect(url)
        for statement in schema_sql():
            await conn.execute(statement)
        seg_sql = ("INSERT INTO outbox_segments (seq, tenant_id, listener_id, received_at, total, events, size) "
                   "SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[], $5::bigint[], "
                   "$6::bigint[], $7::bigint[])")
        body_sql = ("INSERT INTO outbox_bodies (seq, ends, bodies, checksum) SELECT * FROM unnest($1::bigint[], "
                    "$2::bytea[], $3::bytea[], $4::bigint[])")
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            batch = rows()
            async with conn.transaction():
                seqs = [r[0] for r in await conn.fetch("SELECT nextval(pg_get_serial_sequence('outbox_segments', "
                                                       "'seq')) FROM generate_series(1, $1)", SEGMENTS)]
                await conn.execute(seg_sql, seqs, [r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch],
                                   [r[3] for r in batch], [r[3] for r in batch], [r[4] for r in batch])
                await conn.execute(body_sql, seqs, [r[5] for r in batch], [r[6] for r in batch],
                                   [checksum(r[5], r[6]) for r in batch])
                await conn.execute("INSERT INTO checkpoints (tenant_id, listener_id, value, updated_at) VALUES "
                                   "('t', 'L0', $1, 0) ON CONFLICT (tenant_id, listener_id) DO UPDATE SET "
                                   "value = excluded.value", str(seqs[0]))
            leased = await conn.fetch("SELECT s.seq, bodies FROM outbox_segments s JOIN outbox_bodies b ON "
                                      "b.seq = s.seq ORDER BY s.seq")
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                await conn.execute("DELETE FROM outbox_segments WHERE seq = ANY($1::bigint[])", [r[0] for r in leased])
                await conn.execute("DELETE FROM outbox_bodies WHERE seq = ANY($1::bigint[])", [r[0] for r in leased])
            done += SEGMENTS * EVENTS
        elapsed = time.perf_counter() - start
        await conn.close()
        return done / elapsed

    return asyncio.run(run())


def main() -> None:
    with Postgres() as server:
        for name, bench in (("psycopg 3 (store thread)", bench_psycopg), ("asyncpg (event loop)", bench_asyncpg)):
            url = server.database()
            rate = bench(url)
            server.drop(url)
            print(f"{name:28s} {rate:>10,.0f} durable events/s  ({SEGMENTS} segments x {EVENTS} events a commit)")


if __name__ == "__main__":
    main()
