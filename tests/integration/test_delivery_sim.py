"""The engine simulator as a program: `python -m listenerd.sim.engine` prints each accepted envelope."""

import asyncio
import os
import re
import sys
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[2]


def envelope(n):
    return {"id": f"id-{n}", "tenant-id": "t", "listener-id": "L", "source": "pusher",
            "received-at": "2026-11-22T23:59:59.123456Z", "event": {"n": n}}


async def test_standalone_engine_prints_json_lines_and_checks_token():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "listenerd.sim.engine", "--port", "0", "--token", "tok-123456",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        url = re.search(r"(http://\S+)", line).group(1)
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=orjson.dumps([envelope(1), envelope(2)]),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer tok-123456"}) as response:
                assert response.status == 200
            printed = [orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 10)) for _ in range(2)]
            assert printed == [envelope(1), envelope(2)]
            async with http.post(url, data=b"[]", headers={"Content-Type": "application/json"}) as response:
                assert response.status == 401
            async with http.post(url, data=b'[{"id": 1}]', headers={"Content-Type": "application/json",
                                                                   "Authorization": "Bearer tok-123456"}) as response:
                assert response.status == 400
                assert "missing" in (await response.json())["error"]
    finally:
        proc.terminate()
        await proc.wait()
