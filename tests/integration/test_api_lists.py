"""Lists a page at a time, their filters, the tenant summary route, and changes that touch one listener only.

An in-process daemon with scripted sources (a channel or hash starting `broken` fails for good) and
the engine simulator; every run of a source is counted per listener, so a restart shows.
"""

import asyncio
from collections import Counter

import pytest

from listenerd.outcome import Ended, Fail
from listenerd.sim.engine import EngineSim
from tests.daemon import OTHER_TOKEN, base_config, running_daemon
from tests.harness import wait_for

TENANT = """
[[tenants]]
id = "t1"

[tenants.integrations.pusher]
key = "app-key"
secret = "lists-test-secret"

[[tenants.listeners]]
id = "CFG1"
type = "pusher"
options = { channel = "cfg" }
"""
RUNS: Counter = Counter()
LISTENERS = "/1.0/tenants/t1/listeners"


async def counting_source(ctx):
    """Counts its runs; `broken...` fails for good, the others subscribe and wait."""
    RUNS[ctx.listener_id] += 1
    name = getattr(ctx.listener.options, "channel", None) or getattr(ctx.listener.options, "hash", "")
    if name.startswith("broken"):
        raise Ended(Fail(f"Unknown stream: {name}"))
    ctx.started(f"Subscribed to channel: {name}")
    await asyncio.Event().wait()


@pytest.fixture
async def daemon(tmp_path, scripted_source):
    scripted_source("pusher", counting_source)
    scripted_source("datasift", counting_source)
    RUNS.clear()
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as pair:
        yield pair


async def create(api, n, **fields):
    made = []
    for _ in range(n):
        body = {"type": "pusher", "options": {"channel": "c"}, "status": False, **fields}
        code, created = await api.call("POST", LISTENERS, body)
        assert code == 201, created
        made.append(created["id"])
    return made


def ids(pages):
    return [item["id"] for page in pages for item in page]


async def test_pages_cover_every_listener_once_in_id_order(daemon):
    _, api = daemon
    made = await create(api, 25)
    pages = await api.every_page(f"{LISTENERS}?limit=10")
    assert [len(p) for p in pages] == [10, 10, 6]
    assert ids(pages) == ["CFG1", *made] and made[:3] == ["LI1", "LI2", "LI3"] and made[-1] == "LI25"  # LI2 < LI10
    code, everything, link = await api.page(LISTENERS)  # default limit 100: one page, no Link
    assert code == 200 and [x["id"] for x in everything] == ids(pages) and link is None
    code, one, link = await api.page(f"{LISTENERS}?limit=1")
    assert [x["id"] for x in one] == ["CFG1"] and "limit=1" in link and "cursor=" in link
    assert len((await api.page(f"{LISTENERS}?limit=1000"))[1]) == 26


async def test_a_cursor_holds_its_place_across_inserts_and_deletes(daemon):
    _, api = daemon
    made = await create(api, 12)
    code, first, next_page = await api.page(f"{LISTENERS}?limit=5")
    assert [x["id"] for x in first] == ["CFG1", "LI1", "LI2", "LI3", "LI4"]
    for gone in ("LI3", "LI4", "LI7"):  # two from the page already read (one is the cursor's own), one ahead
        assert (await api.call("DELETE", f"{LISTENERS}/{gone}"))[0] == 204
    added = await create(api, 2)
    assert added == ["LI13", "LI14"]  # ids only grow: a deleted id is never handed out again
    rest = await api.every_page(next_page)
    assert ids(rest) == [i for i in made[4:] if i != "LI7"] + added  # nothing skipped, nothing twice


async def test_bad_limits_and_cursors_are_400_naming_the_parameter(daemon):
    _, api = daemon
    for query, field in (("limit=0", "limit"), ("limit=1001", "limit"), ("limit=abc", "limit"), ("limit=-1", "limit"),
                         ("limit=1.5", "limit"), ("cursor=not-a-cursor", "cursor"), ("cursor=eyJhZnRlciI6IDN9",
                                                                                     "cursor"),
                         ("status=enabled", "status"), ("type=twitter", "type")):
        code, body = await api.call("GET", f"{LISTENERS}?{query}")
        assert code == 400 and body["fields"] == [field] and body["error"].startswith(f"{field}:"), (query, body)
    for query, field in (("limit=5000", "limit"), ("cursor=%%%", "cursor"), ("status-code=abc", "status-code")):
        code, body = await api.call("GET", f"/1.0/tenants/t1/dead-letters?{query}")
        assert code == 400 and body["fields"] == [field], (query, body)
    # a listener cursor is not a dead-letter cursor (and the other way round)
    await create(api, 1)
    _, _, link = await api.page(f"{LISTENERS}?limit=1")
    code, body = await api.call("GET", "/1.0/tenants/t1/dead-letters?" + link.split("?", 1)[1])
    assert code == 400 and body["fields"] == ["cursor"]


async def test_filters_by_runtime_status_and_type_page_like_the_whole_list(daemon):
    _, api = daemon
    await create(api, 3)  # disabled: stopped
    broken = await create(api, 2, status=True, options={"channel": "broken-one"})
    code, _ = await api.call("POST", "/1.0/tenants/t1/integrations/datasift",
                             {"username": "u", "api-key": "ds-key-4821"})
    assert code == 200
    code, ds = await api.call("POST", LISTENERS, {"type": "datasift", "options": {"hash": "h1"}})
    assert code == 201
    for lid in broken:
        await api.wait_status("t1", lid, "failed")
    await api.wait_status("t1", ds["id"], "started")
    await api.wait_status("t1", "CFG1", "started")
    assert ids(await api.every_page(f"{LISTENERS}?status=failed")) == broken
    assert ids(await api.every_page(f"{LISTENERS}?status=started")) == ["CFG1", ds["id"]]
    stopped = await api.every_page(f"{LISTENERS}?status=stopped&limit=1")
    assert ids(stopped) == ["LI1", "LI2", "LI3"] and len(stopped) == 3
    assert ids(await api.every_page(f"{LISTENERS}?type=datasift")) == [ds["id"]]
    assert ids(await api.every_page(f"{LISTENERS}?type=pusher&status=started")) == ["CFG1"]
    assert await api.every_page(f"{LISTENERS}?status=retrying") == [[]]


async def test_the_summary_counts_each_status_and_names_the_listeners_not_started(daemon):
    _, api = daemon
    await api.wait_status("t1", "CFG1", "started")
    disabled, = await create(api, 1)
    broken, = await create(api, 1, status=True, options={"channel": "broken-stream"})
    await api.wait_status("t1", broken, "failed")
    code, summary = await api.call("GET", f"{LISTENERS}/status")
    assert code == 200, summary
    assert summary["total"] == 3
    assert summary["counts"] == {"starting": 0, "started": 1, "retrying": 0, "failed": 1, "stopped": 1}
    by_id = {entry["id"]: entry for entry in summary["not-started"]}
    assert set(by_id) == {disabled, broken}
    assert by_id[broken]["status"] == "failed" and by_id[broken]["message"] == "Unknown stream: broken-stream"
    assert by_id[broken]["enabled"] is True and by_id[disabled]["enabled"] is False
    assert by_id[disabled]["status"] == "stopped" and by_id[broken]["type"] == "pusher"
    # the one-listener routes below the same path still answer for listeners
    assert (await api.status("t1", "CFG1"))["status"] == "started"
    assert (await api.call("GET", f"{LISTENERS}/CFG1"))[0] == 200
    code, body = await api.call("POST", LISTENERS, {"id": "status", "type": "pusher", "options": {"channel": "c"}})
    assert code == 400 and body["fields"] == ["id"]
    assert (await api.call("GET", "/1.0/tenants/other/listeners/status"))[1] == {
        "total": 0, "counts": dict.fromkeys(("starting", "started", "retrying", "failed", "stopped"), 0),
        "not-started": []}


async def test_the_new_routes_keep_tenants_apart(daemon):
    _, api = daemon
    await create(api, 2)
    for path in (LISTENERS, f"{LISTENERS}?limit=1", f"{LISTENERS}/status", "/1.0/tenants/t1/dead-letters?limit=1"):
        code, body = await api.call("GET", path, token=OTHER_TOKEN)
        assert code == 403 and "t1" in body["error"], (path, body)
        assert (await api.call("GET", path.replace("/t1/", "/nope/")))[0] == 404
        assert (await api.call("GET", path, token="wrong-token"))[0] == 401
    code, theirs, _ = await api.page("/1.0/tenants/other/listeners?limit=1", token=OTHER_TOKEN)
    assert code == 200 and theirs == []
    # a cursor taken from one tenant's list places nothing of it into another's
    _, _, link = await api.page(f"{LISTENERS}?limit=1")
    code, theirs, _ = await api.page(link.replace("/t1/", "/other/"), token=OTHER_TOKEN)
    assert code == 200 and theirs == []


async def test_dead_letters_page_oldest_first_and_filter(tmp_path, scripted_source):
    async def ticking(ctx):
        ctx.started("Subscribed")
        for i in range(1000):
            await ctx.emit({"n": i})
            await asyncio.sleep(0.005)
        await asyncio.Event().wait()

    scripted_source("pusher", ticking)
    async with EngineSim() as engine:
        engine.script([422] * 7)
        async with running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as (d, api):
            async def refused():
                return len(await d.dead_letters.of_tenant("t1")) >= 7
            await wait_for(refused, what="seven refused batches")
            every = [str(letter.id) for letter in await d.dead_letters.of_tenant("t1")]
            pages = await api.every_page("/1.0/tenants/t1/dead-letters?limit=3")
            assert ids(pages) == every and all(len(p) == 3 for p in pages[:-1]) and len(pages) >= 3
            assert ids(await api.every_page("/1.0/tenants/t1/dead-letters?status-code=422&limit=2")) == every
            assert await api.every_page("/1.0/tenants/t1/dead-letters?status-code=400") == [[]]
            assert await api.every_page("/1.0/tenants/t1/dead-letters?listener-id=LI9") == [[]]
            assert ids(await api.every_page("/1.0/tenants/t1/dead-letters?type=pusher&limit=4")) == every
            assert await api.every_page("/1.0/tenants/t1/dead-letters?type=datasift") == [[]]
            code, body = await api.call("GET", "/1.0/tenants/t1/dead-letters?type=nope")
            assert code == 400 and body["fields"] == ["type"], body
            code, first, link = await api.page("/1.0/tenants/t1/dead-letters?limit=2")
            assert (await api.call("DELETE", f"/1.0/tenants/t1/dead-letters/{first[1]['id']}"))[0] == 204
            assert ids(await api.every_page(link)) == every[2:]  # the cursor survives the delete of its own item


async def test_a_change_to_one_listener_restarts_it_and_no_other(daemon):
    d, api = daemon
    made = await create(api, 4, status=True)
    await api.wait_status("t1", made[-1], "started")
    await wait_for(lambda: all(RUNS[i] == 1 for i in ["CFG1", *made]), what="one run each")
    code, _ = await api.call("PUT", f"{LISTENERS}/{made[1]}", {"options": {"channel": "moved"}})
    assert code == 200
    await wait_for(lambda: RUNS[made[1]] == 2, what="the changed listener restarted")
    code, _ = await api.call("PUT", f"{LISTENERS}/{made[2]}", {"name": "only a name"})  # a name is no restart
    assert code == 200
    assert (await api.call("DELETE", f"{LISTENERS}/{made[3]}"))[0] == 204
    assert (await api.call("POST", f"{LISTENERS}/{made[0]}/restart"))[0] == 202
    await wait_for(lambda: RUNS[made[0]] == 2, what="the restarted listener ran again")
    await api.wait_status("t1", made[1], "started")
    assert {i: RUNS[i] for i in ["CFG1", *made]} == {"CFG1": 1, made[0]: 2, made[1]: 2, made[2]: 1, made[3]: 1}
    assert ("t1", made[3]) not in d.supervisor.records


async def test_an_integration_change_restarts_only_its_connection_group(daemon):
    _, api = daemon
    pusher, = await create(api, 1, status=True)
    code, ds = await api.call("POST", LISTENERS, {"type": "datasift", "options": {"hash": "h1"}})
    assert code == 201
    await api.wait_status("t1", ds["id"], "failed")  # no datasift credentials yet
    code, _ = await api.call("POST", "/1.0/tenants/t1/integrations/datasift",
                             {"username": "u", "api-key": "ds-key-0001"})
    assert code == 200
    await api.wait_status("t1", ds["id"], "started")
    code, _ = await api.call("POST", "/1.0/tenants/t1/integrations/datasift",
                             {"username": "u", "api-key": "ds-key-0002"})
    assert code == 200
    await wait_for(lambda: RUNS[ds["id"]] == 2, what="the datasift listener restarted with the new key")
    await api.wait_status("t1", ds["id"], "started")
    assert RUNS["CFG1"] == 1 and RUNS[pusher] == 1  # the pusher group was not touched


async def test_requests_about_one_listener_do_the_same_store_work_at_10_and_at_1000_listeners(tmp_path,
                                                                                               scripted_source):
    """Issue 16: create, retrieve, status, update, restart and delete of one listener touch that listener
    only. Counted as SQLite virtual-machine steps on the store's connection (a scan of every listener would
    grow a hundredfold from 10 to 1,000; a keyed read or write stays put)."""
    scripted_source("pusher", counting_source)
    unlimited = "[limits]\ntenant-write-rate = 100000\ntenant-write-burst = 100000\n"
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT,
                                                                           unlimited)) as (d, api):
        await _same_store_work(d, api)


async def _same_store_work(d, api):
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0

    await d.store.run(lambda c: c.set_progress_handler(step, 1))

    async def work(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        await d.store.run(lambda c: None)  # what earlier requests left on the store thread is done
        steps[0] = 0
        code, answer = await api.call(method, path, body)
        assert code < 300, (method, path, code, answer)
        await d.store.run(lambda c: None)
        return steps[0], answer

    async def work_of_each_request() -> dict[str, int]:
        out: dict[str, int] = {}
        out["create"], made = await work("POST", LISTENERS, {"type": "pusher", "options": {"channel": "probe"},
                                                             "status": False})
        one = f"{LISTENERS}/{made['id']}"
        out["retrieve"], _ = await work("GET", one)
        out["status"], _ = await work("GET", f"{one}/status")
        out["update"], _ = await work("PUT", one, {"name": "x"})
        out["restart"], _ = await work("POST", f"{one}/restart")
        out["delete"], _ = await work("DELETE", one)
        return out

    await create(api, 9)
    small = await work_of_each_request()
    await create(api, 990)
    large = await work_of_each_request()
    assert small["create"] > 0 and small["delete"] > 0, small  # the handler sees the store's work
    for what, few in small.items():
        assert large[what] <= few * 1.5 + 50, (what, small, large)
    await d.store.run(lambda c: c.set_progress_handler(None, 1))
