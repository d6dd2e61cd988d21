"""Control: the order of each change (store, then the running listeners) and its refusals.

A real store and a real supervisor with scripted sources; the control's fleet reads the store by key
as the daemon's does.
"""

import asyncio

import pytest

from listenerd.control import Conflict, Control, Invalid, NotFound, NotLoaded, Unavailable
from listenerd.fleet import Fleet
from listenerd.model import Config
from listenerd.observability import redactor
from listenerd.testing import InjectedDiskFull
from tests.harness import Harness, wait_for

PUSHER = {"key": "app-key", "secret": "pusher-secret-of-control-tests"}
SALESFORCE = {"consumer-key": "ck", "consumer-secret": "cs-value", "username": "u@example.com", "password": "pw-value"}


@pytest.fixture
async def control(tmp_path):
    config = Config.model_validate({"store": {"path": str(tmp_path / "c.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.2}})
    async with Harness(tmp_path, config) as h:
        supervisor = h.supervisor()
        await supervisor.start({})
        try:
            yield Control(h.store, supervisor, Fleet(h.store, supervisor))
        finally:
            await supervisor.stop()


async def until_status(control, listener_id, want):
    await wait_for(lambda: (r := control.supervisor.status(("t", listener_id))) and r.status == want,
                   what=f"{listener_id} {want}")


async def test_a_checkpoint_is_written_while_its_listener_is_stopped(control, scripted_source, monkeypatch):
    running, seen, writes = [], [], []

    async def run(ctx):
        seen.append(await ctx.checkpoint())
        running.append(ctx)
        try:
            ctx.started("Subscribed")
            await asyncio.Event().wait()
        finally:
            running.remove(ctx)

    store_write = control.store.set_checkpoint

    async def write(tenant_id, listener_id, value):
        writes.append((value, len(running)))
        await store_write(tenant_id, listener_id, value)

    scripted_source("salesforce", run)
    monkeypatch.setattr(control.store, "set_checkpoint", write)
    await control.store.put_integration("t", "salesforce", SALESFORCE)
    spec = await control.create_listener("t", {"type": "salesforce", "options": {"topic": "Orders"}})
    await until_status(control, spec.id, "started")
    assert await control.set_checkpoint("t", spec.id, {"replay": 7}) == 7
    assert writes == [("7", 0)]  # no run was alive to commit over it
    await wait_for(lambda: seen == [None, "7"] and running, what="the new run from the checkpoint")
    assert await control.checkpoint("t", spec.id) == "7"


async def test_checkpoint_refusals_name_the_field(control):
    await control.store.put_integration("t", "salesforce", SALESFORCE)
    await control.create_listener("t", {"id": "SF", "type": "salesforce", "options": {"topic": "x"}, "status": False})
    await control.create_listener("t", {"id": "P", "type": "pusher", "options": {"channel": "c"}, "status": False})
    for listener_id, fields, at_fault in (("P", {"replay": 1}, ["replay"]), ("SF", {"replay": -3}, ["replay"]),
                                          ("SF", {"replay": True}, ["replay"]), ("SF", {}, ["replay"]),
                                          ("SF", {"replay": 1, "more": 2}, ["more"])):
        with pytest.raises(Invalid) as refused:
            await control.set_checkpoint("t", listener_id, fields)
        assert refused.value.fields == at_fault, fields
    with pytest.raises(NotFound):
        await control.checkpoint("t", "SF")  # none stored
    with pytest.raises(NotFound):
        await control.set_checkpoint("t", "NOPE", {"replay": 1})


async def test_a_pubsub_listener_takes_a_replay_id_checkpoint(control):
    await control.store.put_integration("t", "salesforce", SALESFORCE)
    await control.create_listener("t", {"id": "PS", "type": "salesforce-pubsub",
                                        "options": {"topic": "/event/Order__e"}, "status": False})
    assert await control.set_checkpoint("t", "PS", {"replay": 1_234_567}) == 1_234_567
    assert await control.checkpoint("t", "PS") == "1234567"


async def test_delete_stops_the_listener_and_clears_its_checkpoint(control, scripted_source):
    async def run(ctx):
        ctx.started("Subscribed")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    await control.store.put_integration("t", "pusher", PUSHER)
    spec = await control.create_listener("t", {"type": "pusher", "options": {"channel": "c"}})
    await until_status(control, spec.id, "started")
    await control.store.set_checkpoint("t", spec.id, "5")
    await control.delete_listener("t", spec.id)
    assert await control.store.get_checkpoint("t", spec.id) is None
    assert control.supervisor.status(("t", spec.id)) is None
    for read in (control.get_listener, control.status, control.restart_listener, control.delete_listener):
        with pytest.raises(NotFound):
            await read("t", spec.id)


async def test_config_managed_objects_are_refused_and_left_alone(control):
    listener = {"id": "CFG1", "type": "pusher", "options": {"channel": "c"}}
    await control.store.sync_config_objects([("t", "")], [("t", "pusher", PUSHER)], [("t", "CFG1", listener)])
    with pytest.raises(Conflict):
        await control.update_listener("t", "CFG1", {"name": "renamed"})
    with pytest.raises(Conflict):
        await control.delete_listener("t", "CFG1")
    with pytest.raises(Conflict):
        await control.set_integration("t", "pusher", {"key": "other", "secret": "other-secret"})
    kept = await control.get_listener("t", "CFG1")
    assert (kept.name, kept.managed_by) == ("", "config")
    creds = await control.get_integration("t", "pusher")
    assert (creds.key, creds.managed_by) == ("app-key", "config")


async def test_create_and_update_refusals_name_their_fields(control):
    for fields, at_fault in (({"type": "pusher", "options": {}}, ["options.channel"]),
                             ({"type": "pusher", "options": {"channel": "c"}, "managed-by": "api"}, ["managed-by"]),
                             ({"id": 5, "type": "pusher", "options": {"channel": "c"}}, ["id"])):
        with pytest.raises(Invalid) as refused:
            await control.create_listener("t", fields)
        assert refused.value.fields == at_fault
    body = {"id": "A", "type": "pusher", "options": {"channel": "c"}, "status": False}
    assert (await control.create_listener("t", body)).managed_by == "api"
    with pytest.raises(Conflict) as refused:
        await control.create_listener("t", body)
    assert refused.value.fields == ["id"]
    for fields, at_fault in (({"id": "B"}, ["id"]), ({"zeta": 1, "managed-by": "config"}, ["managed-by", "zeta"]),
                             ({"options": {"channel": ""}}, ["options.channel"])):
        with pytest.raises(Invalid) as refused:
            await control.update_listener("t", "A", fields)
        assert refused.value.fields == at_fault
    updated = await control.update_listener("t", "A", {"name": "renamed", "id": "A"})
    assert updated == await control.get_listener("t", "A") and updated.name == "renamed"
    assert [spec.id for spec in (await control.listeners("t"))[0]] == ["A"]
    assert await control.listeners("u") == ([], False)
    with pytest.raises(NotFound):
        await control.get_listener("t", "../A")


async def test_a_stored_listener_the_supervisor_has_not_loaded_is_not_loaded(control):
    await control.store.put_listener("t", "LATE", {"id": "LATE", "type": "pusher", "options": {"channel": "c"}})
    with pytest.raises(NotLoaded):
        await control.status("t", "LATE")


async def test_setting_up_an_integration_registers_its_secrets_and_restarts_its_listeners(control, scripted_source):
    keys = []

    async def run(ctx):
        keys.append(ctx.integration.key)
        ctx.started("Subscribed")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    spec = await control.create_listener("t", {"type": "pusher", "options": {"channel": "c"}})
    await until_status(control, spec.id, "failed")  # no credentials yet
    secret = "a-pusher-secret-set-up-through-control"
    creds = await control.set_integration("t", "pusher", {"id": "pusher", "key": "k1", "secret": secret})
    assert creds.managed_by == "api" and secret not in redactor.scrub(f"leaked {secret}")
    await wait_for(lambda: keys == ["k1"], what="the listener started with the credentials")
    await control.set_integration("t", "pusher", {"key": "k2", "secret": secret})
    await wait_for(lambda: keys == ["k1", "k2"], what="the listener restarted with the new credentials")
    assert [c.key for c in await control.integrations("t")] == ["k2"]
    for kind, fields in (("pusher", {"type": "datasift", "key": "k", "secret": "s"}), ("twitter", {})):
        with pytest.raises(Invalid) as refused:
            await control.set_integration("t", kind, fields)
        assert refused.value.fields == ["type"]
    with pytest.raises(Invalid) as refused:
        await control.set_integration("t", "pusher", {"key": "k3"})
    assert refused.value.fields == ["secret"]
    with pytest.raises(NotFound):
        await control.get_integration("t", "datasift")


async def test_a_failing_store_refuses_changes_as_unavailable_with_a_retry_after(tmp_path):
    async with Harness(tmp_path) as h:
        disk = InjectedDiskFull.install(h.store)
        supervisor = h.supervisor()
        await supervisor.start({})
        control = Control(h.store, supervisor, Fleet(h.store, supervisor), h.outbox.health)
        new = {"name": "made while full", "type": "pusher", "options": {"channel": "c"}}
        disk.full = True
        with pytest.raises(Unavailable) as refused:
            await control.create_listener("t", new)
        assert "database or disk is full" in refused.value.message and refused.value.retry_after == 5
        with pytest.raises(Unavailable):
            await control.set_integration("t", "pusher", PUSHER)
        assert await control.integrations("t") == []  # reads work on a full disk
        assert h.metrics.store_errors.labels("api-write")._value.get() == 2
        assert h.outbox.health.failing
        disk.full = False
        assert (await control.create_listener("t", new)).id == "LI1"
        assert not h.outbox.health.failing  # a write that worked ends the episode
