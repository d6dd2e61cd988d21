"""Command line: run / check / dev / map / status / version. Exit codes: 0 ok, 2 bad config or usage, 1 other."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
from typing import Any

import structlog

from listenerd import config as config_module
from listenerd import version
from listenerd.observability import configure_logging, redactor

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2, as argparse does, with our wording
        self.print_usage(sys.stderr)
        print(f"listenerd: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="listenerd", description="Streams DataSift, Salesforce and Pusher events to an engine.")
    log_format = _Parser(add_help=False)  # accepted before or after the command
    log_format.add_argument("--log-format", choices=("json", "console"), default=argparse.SUPPRESS,
                            help="log format (default: console on a terminal, JSON otherwise)")
    top.add_argument("--log-format", choices=("json", "console"), default=None,
                     help="log format (default: console on a terminal, JSON otherwise)")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser = functools.partial(commands.add_parser, parents=[log_format])  # type: ignore[method-assign]
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", help="config file (default: $LISTENERD_CONFIG, else "
                                      f"{config_module.DEFAULT_PATH})")
    check = commands.add_parser("check", help="validate the config and print a summary")
    check.add_argument("--config", help="config file (default as for run)")
    dev = commands.add_parser("dev", help="a complete local run against built-in simulators")
    dev.add_argument("--listen", default="127.0.0.1:8088", help="API address (default 127.0.0.1:8088)")
    dev.add_argument("--dir", default=None, help="where the store and the sink's JSON-lines file go "
                                                  "(default: a fresh temporary directory)")
    dev.add_argument("--rate", type=float, default=1.0, help="demo events per second per source (default 1)")
    mapper = commands.add_parser("map", help="apply a listener's mapping to one payload")
    mapper.add_argument("--config", required=True, help="config file")
    mapper.add_argument("--listener", required=True, metavar="TENANT/ID", help="the listener, e.g. tenant1/LI1")
    mapper.add_argument("file", nargs="?", help="payload JSON file (default: stdin)")
    status = commands.add_parser("status", help="the running daemon's listeners as a table (exit 3: not all started)")
    status.add_argument("--config", help="config file to find the API address and a token in (default as for run; "
                                         "only its [server] table is read)")
    status.add_argument("--url", help="the daemon's API, e.g. http://127.0.0.1:8088 (default: from server.listen)")
    status.add_argument("--token", help="API token (default: $LISTENERD_TOKEN, else the config's first token that "
                                        "may use --tenant)")
    status.add_argument("--tenant", help="only this tenant (default: every tenant the token may use)")
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument("--interval", type=_positive, default=2.0, help="seconds between refreshes with --watch "
                                                                    "(default 2)")
    status.add_argument("--json", action="store_true", help="print every listener and status object as JSON")
    status.add_argument("--rows", type=_count, default=100, metavar="N",
                        help="at most N started listeners per tenant in the table (default 100); those not "
                             "started are always shown")
    status.add_argument("--all", action="store_true", help="every listener in the table (one request each)")
    commands.add_parser("version", help="print the version")
    return top


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fmt = args.log_format or "auto"
    try:
        match args.command:
            case "version":
                print(f"listenerd {version()}")
                return EXIT_OK
            case "check":
                return check(args.config or config_module.default_path())
            case "map":
                return map_payload(args.config, args.listener, args.file)
            case "status":
                from listenerd.status_cli import main_args

                return main_args(args)
            case "run":
                return run(args.config or config_module.default_path(), fmt)
            case "dev":
                from listenerd.dev import dev

                configure_logging(fmt, "info")
                return asyncio.run(dev(args.listen, args.dir, args.rate))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `listenerd check | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_USAGE


def _problems(exc: config_module.ConfigError) -> int:
    for problem in exc.problems:
        print(redactor.scrub(str(problem)), file=sys.stderr)
    return EXIT_USAGE


def check(path: str) -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as exc:
        return _problems(exc)
    print(config_module.summary(config))
    for warning in config_module.file_warnings(path):
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def run(path: str, fmt: str) -> int:
    configure_logging(fmt)
    log = structlog.get_logger("listenerd")
    try:
        config = config_module.load(path)
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            log.error("invalid config", problem=str(problem))
        return EXIT_USAGE
    redactor.replace("config", config.secret_values())  # the daemon's own owner: a reload replaces it
    configure_logging(fmt if fmt != "auto" else config.log.format, config.log.level)
    from listenerd.daemon import Daemon
    from listenerd.store import StoreUnavailable

    try:
        asyncio.run(Daemon(config, path).run())
    except (StoreUnavailable, OSError) as exc:  # one line (a store's names its path and what to do), no traceback
        log.error("listenerd could not start", error=str(exc))
        return EXIT_FATAL
    except Exception:
        log.exception("listenerd failed")
        return EXIT_FATAL
    return EXIT_OK


def map_payload(path: str, listener_ref: str, file: str | None) -> int:
    from listenerd.mapping import compile_mapping

    try:
        config = config_module.load(path)
    except config_module.ConfigError as exc:
        return _problems(exc)
    tenant_id, _, listener_id = listener_ref.partition("/")
    tenant = config.tenant(tenant_id)
    spec = next((s for s in tenant.listeners if s.id == listener_id), None) if tenant else None
    if spec is None:
        print(f"--listener: no listener {listener_ref!r} in {path} (use TENANT/ID)", file=sys.stderr)
        return EXIT_USAGE
    try:
        raw = open(file, encoding="utf-8").read() if file else sys.stdin.read()  # noqa: SIM115
        message = json.loads(raw)
    except OSError as exc:
        print(f"{file}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"{file or 'stdin'}: not valid JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    payload, meta = split_message(spec.type, message)
    mapping = compile_mapping(spec.mapping)
    event = mapping.apply(payload, meta)
    print(json.dumps(event, indent=2, ensure_ascii=False))
    for field in mapping.unresolved(payload, meta):
        print(f"unresolved: {field} <- {spec.mapping[field]}", file=sys.stderr)
    return EXIT_OK


def split_message(source_type: str, message: Any) -> tuple[Any, dict[str, Any]]:
    """Accept a payload as the source delivers it on the wire, or the bare payload itself.

    DataSift: a stream message `{"hash", "data"}`; Salesforce: a CometD message, by its channel's kind
    (`data.sobject` for a PushTopic, `data.payload` for Platform Events, CDC and generic); Salesforce
    Pub/Sub: the decoded record (a CDC one's `ChangeEventHeader` as `$header`); Pusher: an event frame
    `{"event", "channel", "data"}`. Anything else is taken as the payload root, with no metadata.
    """
    if not isinstance(message, dict):
        return message, {}
    if source_type == "datasift" and isinstance(message.get("data"), dict) and "hash" in message:
        data = message["data"]
        return data, {"$hash": message["hash"], "$deleted": bool(data.get("deleted"))}
    channel = message.get("channel")
    if source_type == "salesforce" and isinstance(message.get("data"), dict) and isinstance(channel, str):
        from listenerd.sources.salesforce import event_of  # by the channel's kind, as the source maps it

        found = event_of(channel, message["data"])
        if found is not None:
            return found
    if source_type == "salesforce-pubsub" and isinstance(message.get("ChangeEventHeader"), dict):
        return message, {"$header": message["ChangeEventHeader"]}  # a decoded CDC record: its header too
    if source_type == "pusher" and "event" in message and "data" in message:
        data = message["data"]
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                pass
        return data, {"$channel": message.get("channel"), "$event": message["event"]}
    return message, {}


if __name__ == "__main__":
    sys.exit(main())
