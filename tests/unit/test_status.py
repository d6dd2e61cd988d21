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


def test_rate_averages_the_last_minute_or_the_seconds_since_the_first_event():
    record = started()
    assert record.rate(1000.0) == 0.0
    for second in range(1000, 1010):  # 3 events a second for 10 s
        record.committed(3, now=second + 0.5)
    assert record.rate(1009.9) == 3.0  # 10 seconds of events: not diluted over a minute
    for second in range(1010, 1070):
        record.committed(1, now=second + 0.1)
    assert record.rate(1069.5) == 1.0  # the last 60 s: only the 1-a-second part
    assert record.rate(1099.5) == 0.5  # 30 s of quiet: half the window empty
    assert record.rate(1200.0) == 0.0  # a quiet minute and more: nothing
    record.committed(6, now=1200.2)
    assert record.rate(1200.3) == 0.1
    assert record.received == 30 + 60 + 6


def test_history_keeps_the_last_twenty_status_changes_with_their_messages():
    record = ListenerStatus("t", "L1")
    record.set("starting", "Starting pusher listener")
    record.set("started", "Subscribed to channel: live")
    record.set("started", "Subscribed to channel: live, again")  # same status: not a change
    assert [(c["status"], c["message"]) for c in record.history()] == [
        ("stopped", "Not started"), ("starting", "Starting pusher listener"),
        ("started", "Subscribed to channel: live")]
    for n in range(30):
        record.set("retrying" if n % 2 == 0 else "started", f"change {n}")
    history = record.history()
    assert len(history) == 20 and history[-1]["message"] == "change 29" and history[0]["message"] == "change 10"
    assert all(c["at"].endswith("Z") for c in history)
    assert record.as_json()["history"] == history
