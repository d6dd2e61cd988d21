"""The status record's waiting notes: outbox full (paused) and store failing, kept across the source's own messages."""

from listenerd.status import PAUSED, ListenerStatus


def started(message="Subscribed to channel: live"):
    record = ListenerStatus("t", "L1")
    record.set("started", message)
    return record


def test_paused_note_comes_and_goes_as_before():
    record = started()
    record.paused(True)
    assert record.message == "Subscribed to channel: live" + PAUSED
    record.paused(False)
    assert record.message == "Subscribed to channel: live"


def test_a_failing_store_is_named_in_a_started_message_and_in_last_error():
    record = started()
    record.store_failing("database or disk is full")
    assert record.status == "started"
    assert record.message == ("Subscribed to channel: live (store failing: database or disk is full; "
                              "new events wait in memory until it writes again)")
    assert record.last_error == "store failing: database or disk is full"
    record.paused(True)  # the uncommitted bound: paused because of the store, not the engine
    assert record.message == ("Subscribed to channel: live (paused: store failing: database or disk is full; "
                              "reading resumes once it writes again)")
    record.paused(False)
    record.store_failing(None)
    assert record.message == "Subscribed to channel: live"
    assert record.last_error == "store failing: database or disk is full"  # the last error, as ever


def test_the_note_survives_a_new_message_from_the_source_and_leaves_with_the_state():
    record = ListenerStatus("t", "L1")
    record.set("retrying", "Connection ended; next attempt in 1.0s", error="Connection ended")
    record.store_failing("disk I/O error")
    assert record.message == "Connection ended; next attempt in 1.0s"  # retrying says why it retries
    assert record.last_error == "store failing: disk I/O error"
    record.set("started", "Subscribed to channel: live")  # reconnected while the store still fails
    assert record.message.endswith("(store failing: disk I/O error; new events wait in memory until it writes again)")
    record.set("stopped", "Stopped: listenerd is shutting down")
    assert record.message == "Stopped: listenerd is shutting down"


def test_a_stopped_listener_keeps_its_last_error():
    record = ListenerStatus("t", "L1")
    record.store_failing("database or disk is full")
    assert record.last_error is None and record.message == "Not started"
