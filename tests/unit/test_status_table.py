"""`listenerd status` without a daemon: the order of rows, the ages, the exit code, the rendering."""

from __future__ import annotations

import io

from rich.console import Console

from listenerd.status_cli import EXIT_NOT_STARTED, EXIT_OK, Snapshot, age, find_target, ordered, table


def row(tenant: str, lid: str, status: str, enabled: bool = True, error: str | None = None) -> dict:
    return {"tenant-id": tenant, "listener": {"id": lid, "type": "pusher", "status": enabled},
            "status": {"status": status, "message": "", "since": "2026-11-30T12:00:00.000Z", "received": 3,
                       "forwarded": 2, "rate": 0.25, "last-error": error}}


def test_rows_keep_the_tenant_order_and_put_trouble_first_then_ids_in_natural_order():
    rows = [row("b", "LI10", "started"), row("b", "LI9", "started"), row("a", "LI1", "started"),
            row("b", "LI2", "retrying"), row("a", "LI3", "failed"), row("b", "LI1", "starting"),
            row("b", "LI4", "stopped", enabled=False), row("b", "LI5", "failed")]
    assert [(r["tenant-id"], r["listener"]["id"]) for r in ordered(rows)] == [
        ("b", "LI5"), ("b", "LI2"), ("b", "LI1"), ("b", "LI4"), ("b", "LI9"), ("b", "LI10"),
        ("a", "LI3"), ("a", "LI1")]


def test_exit_code_counts_enabled_listeners_only():
    assert Snapshot([row("a", "L1", "started"), row("a", "L2", "stopped", enabled=False)]).exit_code == EXIT_OK
    assert Snapshot([row("a", "L1", "started"), row("a", "L2", "starting")]).exit_code == EXIT_NOT_STARTED
    assert Snapshot([]).exit_code == EXIT_OK


def test_age_is_short_and_readable():
    since = "2026-11-30T12:00:00.000Z"
    base = 1796040000.0  # 2026-11-30T12:00:00Z
    assert [age(since, base + s) for s in (0, 59, 61, 3600 + 125, 2 * 86400 + 7200)] == [
        "0s", "59s", "1m01s", "1h02m", "2d2h"]
    assert age(None, base) == "-"
    assert age(since, base - 30) == "0s"  # a clock behind the daemon's: never negative


def test_the_table_fits_the_width_and_marks_disabled_listeners():
    snapshot = Snapshot([row("a", "L1", "retrying", error="Could not connect to " + "x" * 300),
                         row("a", "L2", "stopped", enabled=False)], taken_at=1796040065.0)
    out = io.StringIO()
    Console(file=out, width=90, color_system=None).print(table(snapshot))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 90 for line in lines)
    assert lines[1].split()[:8] == ["a", "L1", "pusher", "retrying", "1m05s", "3", "2", "0.25"]
    assert lines[1].rstrip().endswith("…") and "stopped (disabled)" in lines[2]


def test_options_and_the_environment_give_the_target_before_any_config(tmp_path):
    target = find_target(str(tmp_path / "absent.toml"), "http://127.0.0.1:8088/", None, None,
                         environ={"LISTENERD_TOKEN": "from-the-environment"})
    assert (target.url, target.token) == ("http://127.0.0.1:8088", "from-the-environment")
    config = tmp_path / "listenerd.toml"
    config.write_text('[server]\nlisten = "[::]:9000"\n[[server.tokens]]\nname = "a"\ntoken = "only-tenant-x"\n'
                      'tenants = ["x"]\n[[server.tokens]]\nname = "b"\ntoken = "every-tenant-token"\n')
    target = find_target(str(config), None, None, "y", environ={})
    assert (target.url, target.token) == ("http://[::1]:9000", "every-tenant-token")
    assert find_target(None, None, None, None, environ={"LISTENERD_CONFIG": str(config)}).token == "only-tenant-x"
