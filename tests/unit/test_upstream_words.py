"""Issue 17 finding 1, the response oracle, in each protocol machine: what a server says (a Pusher error,
subscription error or close reason, a DataSift failure, a Pub/Sub API status's details) reaches a status
message only as a short, printable reason, never as the server's text. The CometD and login paths are
driven end to end in tests/integration/test_upstream_answers.py."""

import json

import pytest

from listenerd.outcome import Fail, Retry
from listenerd.sources.datasift_protocol import DataSiftProtocol, End, Resolve
from listenerd.sources.pusher_protocol import PusherProtocol, classify_close
from listenerd.sources.salesforce_pubsub_protocol import DETAILS_LIMIT, LATEST, GrpcError, Start, Subscription

MARKER = "MARKER-OF-THE-UPSTREAM-BODY"
HOSTILE = "upstream says no\x1b[2J\x00\x07\r\n" + "internal-data " * 40 + MARKER + "\x00" + "tail " * 200
AROUND = 160  # what listenerd says around the quoted words


def short_and_printable(reason: str, quoted: int = 160) -> None:
    assert MARKER not in reason and "upstream says no" in reason, reason
    assert all(c.isprintable() for c in reason), repr(reason)
    assert len(reason) <= quoted + AROUND, (len(reason), reason)


def pusher(channel: str = "private-x") -> PusherProtocol:
    from listenerd.model import PusherOptions

    m = PusherProtocol(key="app-key", secret="app-secret-value", activity_timeout=120.0, pong_timeout=30.0, now=0.0)
    m.join(channel, PusherOptions(channel=channel).wants, members=False)
    m.receive(json.dumps({"event": "pusher:connection_established",
                          "data": json.dumps({"socket_id": "1.2", "activity_timeout": 120})}), 0)
    return m


def test_a_pusher_subscription_error():
    m = pusher()
    [resolve] = m.receive(json.dumps({"event": "pusher:subscription_error", "channel": "private-x",
                                      "data": {"error": HOSTILE, "status": 403}}), 1)
    assert isinstance(resolve.outcome, Fail)
    short_and_printable(resolve.outcome.reason)


def test_a_pusher_error_naming_the_channel():
    m = pusher()
    [resolve] = m.receive(json.dumps({"event": "pusher:error", "data": {"code": None,
                                                                       "message": "private-x " + HOSTILE}}), 1)
    short_and_printable(resolve.outcome.reason)


def test_a_pusher_error_then_a_close_without_reason():
    m = pusher()
    m.receive(json.dumps({"event": "pusher:error", "data": {"code": 4201, "message": HOSTILE}}), 1)
    [outcome] = m.closed(4201, None)
    short_and_printable(outcome.reason)


@pytest.mark.parametrize("code", [4001, 4100, 4200, 4999])
def test_a_pusher_close_reason(code):
    short_and_printable(classify_close(code, HOSTILE).reason)


def datasift() -> DataSiftProtocol:
    m = DataSiftProtocol(url="wss://stream.example/multi", api_key="api-key-s3cret", silence_timeout=65,
                         max_frame_bytes=1 << 20)
    m.join("4f3af38ad1c31646561bc814c3e69af5")
    m.opened(0)
    return m


@pytest.mark.parametrize("message", [
    {"status": "failure", "message": HOSTILE},  # the socket's: retried
    {"status": "failure", "message": "bad API key " + HOSTILE},  # the credentials': failed
    {"status": "failure", "message": HOSTILE, "hash": "4f3af38ad1c31646561bc814c3e69af5"},  # one stream's
])
def test_a_datasift_failure(message):
    actions = datasift().receive(json.dumps(message).encode(), 1)
    outcomes = [a.outcome for a in actions if isinstance(a, End | Resolve)]
    assert outcomes and all(isinstance(o, Fail | Retry) for o in outcomes), actions
    for outcome in outcomes:
        short_and_printable(outcome.reason)


@pytest.mark.parametrize("code", ["UNAUTHENTICATED", "NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED",
                                  "UNAVAILABLE", "INTERNAL"])
def test_a_pubsub_status_details(code):
    sub = Subscription("/event/Order__e", Start(LATEST), batch=10)
    sub.open(0.0, 10)
    outcome = sub.failed(GrpcError(code, HOSTILE, "sfdc.error"))
    short_and_printable(outcome.reason, DETAILS_LIMIT)
