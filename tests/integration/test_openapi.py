"""The OpenAPI document matches the routes that exist, and schemathesis finds no 5xx and no schema violation."""

import asyncio
import json
import re
import sys
from pathlib import Path

from listenerd.sim.engine import EngineSim
from tests.daemon import TOKEN, Api, DaemonProcess, base_config, running_daemon

TENANT = """
[[tenants]]
id = "t1"
[tenants.integrations.pusher]
key = "app-key"
secret = "openapi-test-secret"
[[tenants.listeners]]
id = "CFG1"
type = "pusher"
options = { channel = "cfg" }
"""


def canonical(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


async def test_document_describes_exactly_the_routes(tmp_path):
    async with running_daemon(tmp_path, base_config(tmp_path, "http://127.0.0.1:9/1.0/events", TENANT)) as (d, api):
        assert (await api.call("GET", "/1.0/openapi.json", token=None))[0] == 401  # below /1.0: a token
        code, doc = await api.call("GET", "/1.0/openapi.json")
        assert code == 200 and doc["openapi"] == "3.1.0"
        documented = {(method.upper(), canonical(path)) for path, ops in doc["paths"].items() for method in ops}
        served = {(route.method, canonical(route.resource.canonical)) for route in d._runner.app.router.routes()
                  if route.method != "HEAD"}
        assert documented == served


async def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path, started):
    engine = await started(EngineSim())
    daemon = DaemonProcess(tmp_path, base_config(tmp_path, engine.url, TENANT), scripted=True)
    url = await daemon.start()
    try:
        api = Api(url)
        code, doc = await api.call("GET", "/1.0/openapi.json")  # the document, like all of /1.0, needs a token
        await api.close()
        assert code == 200
        (tmp_path / "openapi.json").write_text(json.dumps(doc))
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("schemathesis")), "run", str(tmp_path / "openapi.json"), "--url", url,
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                         "response_schema_conformance",
             "--max-examples", "12", "--seed", "20261123", "--request-timeout", "10",
             "--header", f"Authorization: Bearer {TOKEN}", "--exclude-path-regex", "/tap$",
             "--phases", "examples,coverage,fuzzing",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
        output, _ = await asyncio.wait_for(process.communicate(), 400)
        assert process.returncode == 0, output.decode(errors="replace")[-6000:]
    finally:
        assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()
