"""Issue 17 finding 9, the config side: `-file` only on secret fields, secret files that are regular, bounded
and private, non-UTF-8 or absurdly deep TOML answered with exit 2 and a location, no userinfo printed."""

import os

import pytest

from listenerd import config as config_module
from listenerd.cli import main

BASE = """
[engine]
url = "https://svc:engine-pass-123@engine.example/1.0/events"

[[tenants]]
id = "t1"
[tenants.integrations.pusher]
key = "k"
secret-file = "{secret}"
"""


def write(tmp_path, text, name="listenerd.toml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def secret(tmp_path, mode=0o600):
    path = tmp_path / "pusher.secret"
    path.write_text("pusher-secret-value\n")
    os.chmod(path, mode)
    return path


def test_check_hides_engine_userinfo_and_warns_on_readable_and_linked_secret_files(tmp_path, capsys):
    path = secret(tmp_path, 0o644)
    link = tmp_path / "link.secret"
    link.symlink_to(path)
    config = write(tmp_path, BASE.format(secret=link))
    assert main(["check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "engine-pass-123" not in out + err and "***@engine.example" in out
    assert "is a symlink" in err and "readable by group or others (mode 0644)" in err
    assert "tenants[0].integrations.pusher.secret-file" in err


def test_a_private_regular_secret_file_gives_no_warning(tmp_path, capsys):
    config = write(tmp_path, BASE.format(secret=secret(tmp_path)))
    assert main(["check", "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_file_is_only_for_secret_fields(tmp_path):
    path = secret(tmp_path)
    text = BASE.format(secret=path).replace('key = "k"', f'key-file = "{path}"')
    with pytest.raises(config_module.ConfigError, match="key-file: unknown key"):
        config_module.load(write(tmp_path, text))


@pytest.mark.parametrize("kind", ["fifo", "device", "huge", "binary"])
def test_secret_files_that_cannot_be_secrets_are_refused(tmp_path, kind):
    path = tmp_path / "bad.secret"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    elif kind == "huge":
        path.write_bytes(b"x" * 100_000)
    else:
        path.write_bytes(b"\xff\xfe secret")
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(write(tmp_path, BASE.format(secret=path)))
    assert str(caught.value).startswith("tenants[0].integrations.pusher.secret-file: cannot read secret file")


def test_non_utf8_config_is_exit_2_with_a_line(tmp_path, capsys):
    config = write(tmp_path, b'[server]\nlisten = "127.0.0.1:1"\n# \xff\xfe\n')
    assert main(["check", "--config", str(config)]) == 2
    assert f"{config}:3: not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["x = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 60 + "1" + "}" * 60])
def test_absurdly_deep_toml_is_exit_2(tmp_path, capsys, text):
    config = write(tmp_path, text)
    assert main(["check", "--config", str(config)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
