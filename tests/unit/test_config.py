"""Config: the example validates; each kind of mistake names its location; `check` exits 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from listenerd import config
from listenerd.cli import main
from listenerd.dev import demo_config, simulators

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_ENV = {"LISTENERD_TOKEN": "ops-token-123456", "DATASIFT_API_KEY": "ds-key-9876",
               "SF_CONSUMER_SECRET": "sf-consumer-secret", "SF_PASSWORD": "sf-password",
               "SF_SECURITY_TOKEN": "sf-token", "PUSHER_SECRET": "pusher-secret-1"}

BASE = """
[[server.tokens]]
name = "ops"
token = "ops-token-123456"

[[tenants]]
id = "tenant1"

[tenants.integrations.datasift]
username = "myuser"
api-key = "k-123456"

[[tenants.listeners]]
id = "LI1"
type = "datasift"
options = { hash = "abc" }
"""


def problems(text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, env or {})
    return [str(p) for p in caught.value.problems]


def test_example_config_is_valid():
    cfg = config.load(ROOT / "config" / "listenerd.example.toml", EXAMPLE_ENV)
    assert [s.id for s in cfg.tenants[0].listeners] == ["LI1", "LI2", "LI3", "LI4"]
    assert cfg.tenants[0].listeners[3].options.topic == "/data/AccountChangeEvent"
    assert cfg.tenants[0].listeners[1].options.topic == "/topic/InvoiceStatementUpdates"
    assert cfg.tenants[0].integrations.datasift.api_key == "ds-key-9876"
    assert "sf-password" in cfg.secret_values()


def test_dev_config_is_valid(tmp_path):
    """`listenerd dev` builds its config from its simulators (not started: no socket in a unit test)."""
    sims = simulators()
    for port, sim in enumerate(sims, start=9001):
        sim.port = port  # as if started
    cfg = demo_config("127.0.0.1:0", tmp_path, *sims)
    assert [s.type for s in cfg.tenants[0].listeners] == ["datasift", "salesforce", "pusher", "salesforce",
                                                          "salesforce"]
    assert [s.options.topic for s in cfg.tenants[0].listeners if s.type == "salesforce"] == [
        "/topic/InvoiceStatementUpdates", "/event/Order_Placed__e", "/data/AccountChangeEvent"]
    assert cfg.tenants[0].integrations.salesforce.auth == "jwt"
    assert cfg.tenants[0].integrations.salesforce.private_key in cfg.secret_values()
    cfg = demo_config("127.0.0.1:0", tmp_path, *sims, pubsub_url="http://127.0.0.1:9005")
    assert [s.type for s in cfg.tenants[0].listeners][-1] == "salesforce-pubsub"
    assert cfg.tenants[0].integrations.salesforce.pubsub_url == "http://127.0.0.1:9005"


def test_base_is_valid():
    cfg = config.parse(BASE, {})
    assert cfg.tenants[0].listeners[0].options.hash == "abc"
    assert cfg.engine.retry_initial == 0.5 and cfg.supervisor.backoff_max == 30.0


@pytest.mark.parametrize(("change", "expected"), [
    (('options = { hash = "abc" }', "options = {}"), "tenants[0].listeners[0].options.hash: required"),
    (('options = { hash = "abc" }', 'options = { hash = "abc" }\nstatus = "yes please"'),
     "tenants[0].listeners[0].status: Input should be a valid boolean"),
    (('type = "datasift"', 'type = "twitter"'),
     "tenants[0].listeners[0].type: unknown listener type 'twitter' "
     "(expected one of: datasift, pusher, salesforce, salesforce-pubsub)"),
    (('options = { hash = "abc" }', 'options = { hash = "abc", colour = "red" }'),
     "tenants[0].listeners[0].options.colour: unknown key"),
    (('username = "myuser"', 'username = "myuser"\napi_key2 = 1'),
     "tenants[0].integrations.datasift.api_key2: unknown key"),
    (('api-key = "k-123456"', 'api-key = "${DATASIFT_API_KEY}"'),
     "tenants[0].integrations.datasift.api-key: environment variable DATASIFT_API_KEY is not set"),
    (('id = "LI1"', 'id = "LI1"\nmapping = { user = "a..b" }'),
     "tenants[0].listeners[0].mapping.user: path 'a..b' has an empty segment"),
    (('id = "tenant1"', 'id = "bad id!"'), "tenants[0].id: must be 1-64 letters"),
])
def test_each_mistake_names_its_location(change, expected):
    old, new = change
    found = problems(BASE.replace(old, new, 1))
    assert any(p.startswith(expected) for p in found), found


def test_duplicate_ids_and_missing_integration():
    text = BASE + """
[[tenants.listeners]]
id = "LI1"
type = "datasift"
options = { hash = "def" }

[[tenants.listeners]]
id = "LI9"
type = "pusher"
options = { channel = "orders" }

[[tenants]]
id = "tenant1"
"""
    found = problems(text)
    assert "tenants[0].listeners[1].id: duplicate listener id 'LI1' in tenant 'tenant1'" in found
    assert any(p.startswith("tenants[0].listeners[2].type: no pusher integration") for p in found)
    assert "tenants[1].id: duplicate tenant id 'tenant1'" in found


def test_the_listener_id_status_is_reserved_as_in_the_api():
    found = problems(BASE + """
[[tenants.listeners]]
id = "status"
type = "datasift"
options = { hash = "def" }
""")
    assert found == ["tenants[0].listeners[1].id: 'status' is reserved "
                     "(GET .../listeners/status is the tenant's summary)"]
    config.parse(BASE.replace('id = "LI1"', 'id = "Status"'), {})  # only that exact id: ids are case-sensitive


def test_token_naming_unknown_tenant():
    found = problems(BASE.replace('token = "ops-token-123456"', 'token = "ops-token-123456"\ntenants = ["nope"]'))
    assert found == ["server.tokens[0].tenants[0]: unknown tenant 'nope'"]


def test_secret_file_and_its_errors(tmp_path):
    (tmp_path / "key").write_text("from-a-file-123\n")
    text = BASE.replace('api-key = "k-123456"', 'api-key-file = "key"')
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert config.load(path, {}).tenants[0].integrations.datasift.api_key == "from-a-file-123"
    path.write_text(BASE.replace('api-key = "k-123456"', 'api-key-file = "missing"'))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, {})
    assert str(caught.value.problems[0]).startswith("tenants[0].integrations.datasift.api-key-file: cannot read")
    path.write_text(BASE.replace('api-key = "k-123456"', 'api-key = "x1234"\napi-key-file = "key"'))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, {})
    assert "give either api-key or api-key-file" in str(caught.value)


def test_dollar_escape():
    cfg = config.parse(BASE.replace('api-key = "k-123456"', 'api-key = "pa$$word"'), {})
    assert cfg.tenants[0].integrations.datasift.api_key == "pa$word"


def test_not_toml():
    assert problems("[server\nlisten=")[0].startswith("<config>: not valid TOML")


def test_check_command_exit_codes_and_streams(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    assert main(["check", "--config", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("config ok: 1 tenant(s), 1 listener(s)") and err == ""
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace('options = { hash = "abc" }', "options = {}"))
    assert main(["check", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "tenants[0].listeners[0].options.hash: required"
    assert main(["check", "--config", str(tmp_path / "absent.toml")]) == 2


def test_check_via_env_and_module_entry(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    result = subprocess.run([sys.executable, "-m", "listenerd", "check"], capture_output=True, text=True,
                            env={"LISTENERD_CONFIG": str(path), "PATH": ""}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "LI1 datasift enabled: stream abc" in result.stdout
    usage = subprocess.run([sys.executable, "-m", "listenerd", "frobnicate"], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2


@pytest.mark.parametrize("argv", [["--log-format", "json", "run"], ["run", "--log-format", "json"]])
def test_log_format_is_accepted_before_or_after_the_command(argv):
    from listenerd.cli import parser

    assert parser().parse_args(argv).log_format == "json"
    assert parser().parse_args(["run"]).log_format is None


def test_every_problem_is_reported_at_once_even_with_a_missing_variable(tmp_path):
    text = BASE.replace('api-key = "k-123456"', 'api-key = "${DATASIFT_API_KEY}"').replace(
        'options = { hash = "abc" }', 'options = {}\nmapping = { who = "a..b" }').replace(
        'token = "ops-token-123456"', 'token = "${LISTENERD_TOKEN}"')
    assert set(problems(text)) == {
        "server.tokens[0].token: environment variable LISTENERD_TOKEN is not set",
        "tenants[0].integrations.datasift.api-key: environment variable DATASIFT_API_KEY is not set",
        "tenants[0].listeners[0].options.hash: required",
        "tenants[0].listeners[0].mapping.who: path 'a..b' has an empty segment",
    }


def test_a_pubsub_listener_runs_on_the_salesforce_integration():
    listener = """
[[tenants.listeners]]
id = "LP"
type = "salesforce-pubsub"
options = { topic = "/event/Order__e", batch = 20 }
"""
    assert problems(BASE + listener) == [
        "tenants[0].listeners[1].type: no salesforce integration: add [tenants.integrations.salesforce] "
        "to tenant 'tenant1'"]
    salesforce = """
[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "cs-123"
username = "u@example.com"
password = "pw-123"
pubsub-url = "http://127.0.0.1:7443"
"""
    cfg = config.parse(BASE.replace("[[tenants.listeners]]", salesforce + "\n[[tenants.listeners]]", 1) + listener,
                       {})
    assert cfg.tenants[0].listeners[1].options.batch == 20
    line = config.summary(cfg).splitlines()[-1]
    assert line.endswith("LP salesforce-pubsub enabled: Pub/Sub topic /event/Order__e (replay resume, batch 20), "
                         "mapping 0 field(s)")
    bad = BASE + listener.replace('"/event/Order__e", batch = 20', '"Invoices", batch = 500')
    found = problems(bad.replace("[[tenants.listeners]]", salesforce.replace("http://127.0.0.1:7443", "ftp://x")
                                 + "\n[[tenants.listeners]]", 1))
    assert any(p.startswith("tenants[0].listeners[1].options.topic: must be /event/") for p in found), found
    assert any(p.startswith("tenants[0].listeners[1].options.batch: ") for p in found), found
    assert any(p.startswith("tenants[0].integrations.salesforce.pubsub-url: must be https://") for p in found), found


@pytest.mark.parametrize(("extra", "expected"), [
    ('[cluster]\nnode-id = "a"\n', "cluster: only with a PostgreSQL store: set [store] url"),
    ('[store]\nurl = "mysql://u@h/d"\n', "store.url: a postgresql://user@host/database URL"),
    ('[store]\nurl = "postgresql://u@h/d"\npath = "/x.db"\n', "store: give either path (SQLite) or url"),
    ('[store]\nurl = "postgresql://u@h/d"\n[cluster]\nlease-ttl = "5 parsecs"\n', "cluster.lease-ttl: a duration"),
    ('[store]\nurl = "postgresql://u@h/d"\n[cluster]\nlease-ttl = "500ms"\n', "cluster.lease-ttl: must be between"),
    ('[store]\nurl = "postgresql://u@h/d"\n[cluster]\nadvertise = "ftp://x"\n', "cluster.advertise: an http(s)"),
    ('[store]\nurl = "postgresql://u@h/d"\n[cluster]\nnode-id = "a b"\n', "cluster.node-id:"),
])
def test_cluster_keys_are_checked_with_their_location(extra, expected):
    found = problems(extra + BASE)
    assert any(p.startswith(expected) for p in found), found


def test_a_cluster_on_postgresql_with_its_defaults_and_the_url_password_kept_secret():
    cfg = config.parse('[store]\nurl = "postgresql://lst:pg-pass-31337@db/l"\n[cluster]\nlease-ttl = "1m"\n' + BASE, {})
    assert cfg.cluster.lease_ttl == 60.0 and cfg.cluster.node_id and cfg.cluster.advertise is None
    assert "pg-pass-31337" in cfg.secret_values()
    assert config.parse(BASE, {}).cluster is None
