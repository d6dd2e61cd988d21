"""The chaos rig's ledger: what it calls loss, duplication and disorder (pure bookkeeping, no daemon)."""

from bench.chaos.rig import Ledger


def envelope(n: int, listener: str = "P0", id_: str | None = None, source: str = "pusher") -> dict:
    return {"id": id_ or f"ev-{n}", "tenant-id": "t0", "listener-id": listener, "source": source,
            "event": {"seq": n}}


def test_first_deliveries_in_publish_order_per_listener_are_in_order_despite_gaps_duplicates_and_interleaving():
    ledger = Ledger()
    for n in range(8):
        ledger.published["pusher"][n] = 1
    # P0 gets 0, 2, 5 (1 and 3 never received), P1 gets 4 between them; 2 is delivered again after 5
    ledger.on_engine([envelope(0), envelope(2), envelope(4, "P1"), envelope(5), envelope(2), envelope(6, "P1")])
    report = ledger.report("pusher")
    assert report["out_of_order"] == 0 and report["out_of_order_events"] == 0
    assert report["duplicates"] == 1


def test_a_first_delivery_after_a_later_event_of_the_same_listener_is_out_of_order():
    ledger = Ledger()
    for n in range(6):
        ledger.published["pusher"][n] = 1
    # a failover where the new owner forwarded its own events (3, 4) before the old owner's backlog (1, 2)
    ledger.on_engine([envelope(0), envelope(3), envelope(4), envelope(1), envelope(2), envelope(5, "P1")])
    report = ledger.report("pusher")
    assert report["out_of_order"] == 1 and report["out_of_order_events"] == 2
    assert report["out_of_order_examples"] == [("t0/P0", 1, 4), ("t0/P0", 2, 4)]
    assert ledger.report("datasift")["out_of_order"] == 0


def cluster_result(**changes) -> dict:
    """A cluster chaos result that `check` passes, as `bench.chaos.cluster.run` returns it, with `changes`."""
    sources = {s: Ledger().report(s) for s in ("pusher", "datasift", "salesforce")}
    result = {"ttl": 3.0, "lost_committed": 0, "sources": sources, "kill9_moved_s": 4.0, "pause_stood_down": True,
              "max_overlap_s": 0.5, "sim_max_overlap_s": 0.5, "sim_connections_unnamed": 0,
              "rolling_moves_s": [0.5, 0.6, 0.7], "pg_restart_s": 1.0, "pg_restart_stood_down": 0,
              "nodes": 3}
    result.update(changes)
    return result


def test_the_cluster_check_fails_a_run_whose_events_were_first_delivered_out_of_order():
    from bench.chaos.cluster import check

    assert check(cluster_result()) == []
    ledger = Ledger()
    ledger.published["datasift"].update({0: 1, 1: 1})
    ledger.on_engine([envelope(1, "D0", source="datasift"), envelope(0, "D0", source="datasift")])
    sources = {**cluster_result()["sources"], "datasift": ledger.report("datasift")}
    problems = check(cluster_result(sources=sources))
    assert len(problems) == 1 and problems[0].startswith("datasift: 1 listeners' events first delivered out of"), \
        problems


def test_the_cluster_check_holds_nodes_running_through_a_short_database_restart_and_stopped_through_a_long_one():
    from bench.chaos.cluster import check

    def problems(ttl, restart, stood):
        return check(cluster_result(ttl=ttl, kill9_moved_s=1.0, pg_restart_s=restart, pg_restart_stood_down=stood))

    # TTL 10 s: renewed every 3.3 s, stood down after 7.5 s without one; a restart under 2.67 s stops no node
    assert problems(10.0, 0.4, 0) == []
    assert problems(10.0, 0.4, 1) == ["PostgreSQL restarted in 0.4 s (< 2.67 s, within which leases are renewed in "
                                      "time) and 1 nodes stood down"]
    assert problems(10.0, 5.0, 0) == [] and problems(10.0, 5.0, 3) == [], "either, depending on the last renewal"
    assert problems(10.0, 9.0, 3) == []
    assert problems(10.0, 9.0, 2) == ["PostgreSQL restarted in 9.0 s (>= 0.75 x TTL): only 2 of 3 nodes stood down; "
                                      "the others ran on without proof of their leases"]
    # the CI run's 3 s TTL: the reconnect's second alone may take a node to its stand-down, so either is right
    assert problems(3.0, 0.1, 3) == [] and problems(3.0, 1.0, 0) == []


def test_the_cluster_check_fails_a_run_where_two_nodes_committed_one_event():
    from bench.chaos.cluster import check

    ledger = Ledger()
    ledger.published["pusher"][0] = 2
    ledger.on_engine([envelope(0, id_="from-a"), envelope(0, id_="from-b")])  # read on both sockets, both committed
    sources = {**cluster_result()["sources"], "pusher": ledger.report("pusher")}
    assert check(cluster_result(sources=sources)) == ["pusher: 1 events delivered under two ids"]
