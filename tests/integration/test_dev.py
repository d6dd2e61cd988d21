"""`listenerd dev` in a subprocess: every demo listener started (Salesforce by JWT: PushTopic, Platform Event,
CDC, and the Pub/Sub API), events from every listener type, SIGINT exits 0."""

import asyncio
import json
import re
import signal
import sys

from tests.daemon import Api
from tests.harness import wait_for


def output_files(tmp_path):
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    return out, err, open(out, "wb"), open(err, "wb")  # noqa: SIM115 - the child writes them


async def test_dev_run_streams_all_three_sources_and_stops_on_sigint(tmp_path):
    out, err, stdout, stderr = output_files(tmp_path)
    with stdout, stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "listenerd", "dev", "--listen", "127.0.0.1:0", "--dir", str(tmp_path),
            "--rate", "10", stdout=stdout, stderr=stderr)
    try:
        match = await wait_for(lambda: re.search(r"API:\s+(http://\S+)\s+token: (\S+)", out.read_text()),
                               timeout=30, what="the banner")
        api = Api(match.group(1), token=match.group(2))
        try:
            for lid in ("LI1", "LI2", "LI3", "LI4", "LI5", "LI6"):
                await api.wait_status("demo", lid, "started", timeout=30)
        finally:
            await api.close()

        def sources():
            lines = (tmp_path / "engine-events.jsonl").read_text().splitlines()
            return {json.loads(line)["source"] for line in lines}
        await wait_for(lambda: sources() == {"datasift", "pusher", "salesforce", "salesforce-pubsub"}, timeout=30,
                       what="events from all four listener types in the sink")

        def salesforce_events():
            lines = (tmp_path / "engine-events.jsonl").read_text().splitlines()
            by_listener: dict[str, dict] = {}
            for line in lines:
                envelope = json.loads(line)
                by_listener.setdefault(envelope["listener-id"], envelope["event"])
            return by_listener if {"LI2", "LI4", "LI5"} <= set(by_listener) else None
        seen = await wait_for(salesforce_events, timeout=30, what="PushTopic, Platform Event and CDC events")
        assert seen["LI4"]["order"].startswith("ORD-") and len(seen["LI4"]["uuid"]) == 36
        assert seen["LI5"]["change"] in ("CREATE", "UPDATE") and seen["LI5"]["records"][0].startswith("001")
        assert isinstance(seen["LI4"]["replay-id"], int) and isinstance(seen["LI5"]["replay-id"], int)
        text = out.read_text()
        first = next(line for line in text.splitlines() if line.strip())
        assert f"{match.group(1)}/console/" in first, first  # the console's address comes first
        assert "curl -s -H \"Authorization: Bearer" in text and "/listeners/LI1/status" in text
        assert re.search(r"engine <- datasift\s+demo/LI1\s+\{\"username\"", text)
    finally:
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0, err.read_text()[-3000:]
    lines = [json.loads(line) for line in err.read_text().splitlines()]  # JSON mode: every line is JSON
    assert any(x["event"] == "listenerd stopped" and x["undelivered"] == 0 for x in lines)
    assert "PRIVATE KEY" not in out.read_text() + err.read_text()  # the throwaway key stays in memory
    for line in lines:
        if line.get("logger") in ("listenerd.source", "listenerd.supervisor"):
            assert line.get("tenant") == "demo" and line.get("listener"), line
