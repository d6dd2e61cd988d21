"""Tap fan-out: publishing never waits; a full client queue counts what that client missed."""

from listenerd.tap import TapHub


async def test_slow_subscriber_misses_events_and_others_do_not():
    hub = TapHub(queue_size=3)
    slow = hub.subscribe("t", "L")
    fast = hub.subscribe("t", "L")
    other = hub.subscribe("t", "OTHER")
    received = []
    for n in range(10):
        hub.publish("t", "L", {"id": str(n)})
        received.append(fast.queue.get_nowait()["id"])  # the fast client keeps up
    assert received == [str(n) for n in range(10)]
    assert [slow.queue.get_nowait()["id"] for _ in range(3)] == ["0", "1", "2"]
    assert slow.missed == 7 and fast.missed == 0
    assert other.queue.empty()
    assert hub.clients("t", "L") == 2
    hub.unsubscribe("t", "L", slow)
    hub.unsubscribe("t", "L", fast)
    assert hub.clients("t", "L") == 0
    hub.publish("t", "L", {"id": "x"})  # nobody listening: nothing happens
