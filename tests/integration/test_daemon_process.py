"""The daemon as a real process: sd_notify, SIGHUP reload, SIGTERM, and no secret in its logs."""

import base64
import json
import signal
import socket
from urllib.parse import quote, quote_plus

import pytest

from listenerd.sim.engine import EngineSim
from tests.daemon import TOKEN, Api, DaemonProcess, base_config
from tests.harness import wait_for

ENGINE_TOKEN = "engine-token-abcdef123456"
SECRETS = {"pusher": "pusher-secret-zyxw9876", "datasift": "datasift-key-qwer5678",
           "sf_password": "sf-password-asdf4321", "sf_consumer": "sf-consumer-ghjk1357",
           "sf_token": "sf-token-lkjh2468"}


def tenants(b_channel: str = "b") -> str:
    return f"""
[[tenants]]
id = "t"

[tenants.integrations.pusher]
key = "app-key"
secret = "${{PUSHER_SECRET}}"

[tenants.integrations.datasift]
username = "user"
api-key = "{SECRETS['datasift']}"

[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "{SECRETS['sf_consumer']}"
username = "u@example.com"
password = "{SECRETS['sf_password']}"
secret-token = "{SECRETS['sf_token']}"

[[tenants.listeners]]
id = "A"
type = "pusher"
options = {{ channel = "a" }}

[[tenants.listeners]]
id = "B"
type = "pusher"
options = {{ channel = "{b_channel}" }}

[[tenants.listeners]]
id = "D"
type = "datasift"
options = {{ hash = "abc" }}
"""


@pytest.fixture
async def engine():
    async with EngineSim(token=ENGINE_TOKEN) as sim:
        yield sim


def config_text(tmp_path, engine, b_channel="b"):
    text = base_config(tmp_path, engine.url, tenants(b_channel))
    return text.replace("[engine]\n", f'[engine]\ntoken = "{ENGINE_TOKEN}"\n')


class NotifySocket:
    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def seen(self, line: str) -> int | None:
        for index, message in enumerate(self.drain()):
            if line in message.split("\n"):
                return index
        return None


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_sd_notify_ready_watchdog_stopping(tmp_path, engine, kind, started):
    address = str(tmp_path / "notify.sock") if kind == "path" else f"@listenerd-test-{id(tmp_path)}"
    notify = NotifySocket(address)
    daemon = DaemonProcess(tmp_path, config_text(tmp_path, engine), scripted=True,
                           env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
                                "PUSHER_SECRET": SECRETS["pusher"]})
    await started(daemon)
    await wait_for(lambda: notify.seen("READY=1") is not None, what="READY=1")
    ready = notify.seen("READY=1")
    await wait_for(lambda: (i := notify.seen("WATCHDOG=1")) is not None and i > ready, what="WATCHDOG=1")
    assert any(m.startswith("READY=1") and "STATUS=" in m for m in notify.messages)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    await wait_for(lambda: notify.seen("STOPPING=1") is not None, what="STOPPING=1")
    assert notify.seen("STOPPING=1") > ready
    notify.sock.close()


async def test_reload_restarts_only_the_changed_listener_and_refuses_a_bad_config(tmp_path, engine):
    notify_address = str(tmp_path / "n.sock")
    notify = NotifySocket(notify_address)
    daemon = DaemonProcess(tmp_path, config_text(tmp_path, engine), scripted=True,
                           env={"PUSHER_SECRET": SECRETS["pusher"], "NOTIFY_SOCKET": notify_address})
    api = Api(await daemon.start())
    try:
        for lid in ("A", "B", "D"):
            await api.wait_status("t", lid, "started")
        before = {lid: (await api.status("t", lid))["since"] for lid in ("A", "B", "D")}

        daemon.config_path.write_text(config_text(tmp_path, engine, b_channel="b2"))
        daemon.signal(signal.SIGHUP)
        reloaded = await wait_for(lambda: daemon._find("config reloaded"), what="reload logged")
        assert reloaded["restarted"] == ["t/B"] and "started" not in reloaded
        assert "RELOADING=1" in "".join(notify.drain())
        await api.wait_status("t", "B", "started")
        after = {lid: (await api.status("t", lid))["since"] for lid in ("A", "B", "D")}
        assert after["A"] == before["A"] and after["D"] == before["D"] and after["B"] != before["B"]

        daemon.config_path.write_text(config_text(tmp_path, engine).replace('hash = "abc"', "colour = 1"))
        daemon.signal(signal.SIGHUP)
        refused = await wait_for(lambda: [x for x in daemon.lines() if x.get("event") == "config reload refused"],
                                 what="reload refused")
        problems = {x["problem"] for x in refused}
        assert "tenants[1].listeners[2].options.hash: required" in problems  # tenants[0] is "other"
        await wait_for(lambda: any("Reload failed" in m for m in notify.drain()), what="STATUS says reload failed")
        for lid in ("A", "B", "D"):
            status = await api.status("t", lid)
            assert status["status"] == "started" and status["since"] == after[lid]
    finally:
        await api.close()
        assert await daemon.stop() == 0
    notify.sock.close()


async def test_sigterm_flushes_and_exits_zero_and_logs_hold_no_secret(tmp_path, engine):
    daemon = DaemonProcess(tmp_path, config_text(tmp_path, engine), scripted=True,
                           env={"PUSHER_SECRET": SECRETS["pusher"]})
    api = Api(await daemon.start())
    try:
        await api.wait_status("t", "A", "started")
        await wait_for(lambda: len(engine.events()) > 20, what="events delivered with the engine token")
        # provoke logging around secrets: a bad token, a bad integration post, a status read
        await api.call("GET", "/1.0/tenants/t/listeners", token=SECRETS["pusher"])
        await api.call("POST", "/1.0/tenants/t/integrations/pusher", {"key": "k", "secret": SECRETS["pusher"]})
        code, body = await api.call("GET", "/1.0/tenants/t/integrations")
        assert code == 200
        assert not any(secret in str(body) for secret in SECRETS.values())
        # SIGUSR1: where each task waits, one log line each (what a hung stop is asked before a kill)
        daemon.signal(signal.SIGUSR1)
        tasks = await wait_for(lambda: [x for x in daemon.lines() if x.get("event") == "task"], what="task lines")
        assert any(any("supervisor.py" in frame for frame in x["where"]) for x in tasks), tasks[:3]
    finally:
        await api.close()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    lines = daemon.lines()
    assert all(line.get("event") != "NOT JSON" for line in lines), [x for x in lines if x["event"] == "NOT JSON"]
    stopped = [x for x in lines if x.get("event") == "listenerd stopped"]
    assert stopped and stopped[-1]["undelivered"] == 0
    text = daemon.log_text()
    for secret in [*SECRETS.values(), ENGINE_TOKEN, TOKEN]:
        assert secret not in text
    assert len(engine.events()) > 20


async def test_bad_config_exits_2_and_names_the_variable(tmp_path, engine):
    daemon = DaemonProcess(tmp_path, config_text(tmp_path, engine), scripted=True, env={})
    daemon.env.pop("PUSHER_SECRET", None)
    with pytest.raises(AssertionError, match="exited with 2"):
        await daemon.start(timeout=15)
    lines = daemon.lines()
    assert [x["problem"] for x in lines] == [
        "tenants[1].integrations.pusher.secret: environment variable PUSHER_SECRET is not set"]
    assert lines[0]["event"] == "invalid config" and lines[0]["level"] == "error"


async def test_engine_url_userinfo_never_reaches_the_logs_or_the_api(tmp_path):
    """`engine.url` with `user:password@`: the daemon authenticates with it (Basic, as aiohttp sends it) and
    no log line or API answer holds the password in any form it could take: as written in the URL
    (percent-encoded), decoded, form-encoded, JSON-escaped, or inside the Basic header's base64. The engine
    is made to fail several ways so the forwarder writes what it writes about the engine: errors, a
    refused connection, and a redirect to a URL that repeats the credentials."""
    password = 'Engine p@ss/w0rd:x%7"'
    user = "svc-listenerd"
    async with EngineSim() as engine:
        url = engine.url.replace("http://", f"http://{user}:{quote(password, safe='')}@", 1)
        text = base_config(tmp_path, url, tenants())
        daemon = DaemonProcess(tmp_path, text, scripted=True, env={"PUSHER_SECRET": SECRETS["pusher"]})
        api = Api(await daemon.start())
        answers = []
        try:
            await api.wait_status("t", "A", "started")
            await wait_for(lambda: len(engine.events()) > 5, what="events delivered with the URL's credentials")
            basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            assert engine.requests[-1].authorization == basic
            engine.script([(503, {}, "engine busy"), (401, {}, {"error": "bad credentials"}),
                           (307, {"Location": url.replace("/1.0/events", "/2.0/events")}),
                           (400, {}, {"error": "malformed batch"})])
            await wait_for(lambda: engine.scripted_left == 0, what="the scripted engine answers")
            answers.append(await api.call("GET", "/1.0/engine"))
            await engine.refuse()
            await wait_for(lambda: any("POST to the engine failed" in str(x) for x in daemon.lines()),
                           what="a refused connection to the engine logged")
            answers.append(await api.call("GET", "/1.0/engine"))
            await engine.accept()
            for path in ("/1.0/engine", "/1.0/tenants/t/listeners", "/1.0/tenants/t/listeners/A/status",
                         "/1.0/tenants/t/dead-letters", "/metrics"):
                answers.append(await api.call("GET", path))
                assert answers[-1][0] == 200, (path, answers[-1])
        finally:
            await api.close()
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait_exit() == 0
    log = daemon.log_text()
    assert "engine refused a batch" in log and "the engine redirects to" in log  # the paths were taken
    assert f"***@{engine.host}" in log  # the URL as logged at start
    seen = log + "\n".join(repr(answer) for answer in answers)
    forms = {password, quote(password, safe=""), quote(password), quote_plus(password),
             json.dumps(password)[1:-1], base64.b64encode(f"{user}:{password}".encode()).decode(),
             base64.b64encode(f"{user}:{quote(password, safe='')}".encode()).decode()}
    for form in forms:
        assert form not in seen, form
