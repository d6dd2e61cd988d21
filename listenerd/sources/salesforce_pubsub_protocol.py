"""Salesforce Pub/Sub API subscription decisions, without I/O: where to start, how much to ask for,
what an error means, when silence means a dead stream.

The driver (`salesforce_pubsub.py`) moves `FetchRequest`s and `FetchResponse`s on a gRPC stream and
asks this core what to do; the core never touches a socket or a clock of its own (times come in).

- **Replay**: a start is a preset (`LATEST`, `EARLIEST`) or `CUSTOM` with replay id bytes. The
  checkpoint is the replay id as the decimal string of its bytes read big-endian (the contract's
  `$event.replayId`, and an integer the checkpoint API already takes); it goes back to bytes as an
  8-byte big-endian long (the width of every replay id Salesforce's examples print), wider only if
  the number needs it.
- **Flow control** (pull): the first request names the topic and the start and asks for `batch`
  events; later requests only add `num_requested`, which the server adds to what it still owes. We
  ask again only when less than half a batch is owed AND the outbox has room, and never for more
  than `batch` in all, so the server never holds more than one batch for us and an engine outage
  stops the stream at the outbox bound instead of filling memory.
- **Liveness**: with nothing to send the server answers an empty `FetchResponse` at least every
  270 s (a keepalive carrying `latest_replay_id`); any response proves the stream lives. Silent
  past `KEEPALIVE_INTERVAL * margin` means a dead stream: `Retry("heartbeat")`, reconnect at once.
- **Errors** are gRPC status codes with Salesforce's own code in the `error-code` trailer
  (https://developer.salesforce.com/docs/platform/pub-sub-api/guide/handling-errors.html):
  `UNAUTHENTICATED` -> log in again (once; a fresh token refused too is `retrying`, named);
  a replay id the server refuses (`INVALID_ARGUMENT` with a `replayid` code) -> subscribe again from
  the fallback (`EARLIEST` for `resume`/`all`, `LATEST` for `new`), reported as a gap, as the CometD
  listener does; another `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` -> `failed` (that
  listener only); anything else (`UNAVAILABLE`, `INTERNAL`, a stream ended by the server) -> `retrying`.
"""

from __future__ import annotations

from dataclasses import dataclass

from listenerd.net import sanitised
from listenerd.outcome import Fail, Retry

KEEPALIVE_INTERVAL = 270.0  # Salesforce: an empty FetchResponse at least this often on an idle stream
MAX_BATCH = 100  # Salesforce: at most 100 events per FetchRequest's num_requested
REPLAY_ID_BYTES = 8
AUTH_ERROR = "sfdc.platform.eventbus.grpc.service.auth.error"

LATEST, EARLIEST, CUSTOM = "LATEST", "EARLIEST", "CUSTOM"
PRESET_NUMBERS = {LATEST: 0, EARLIEST: 1, CUSTOM: 2}  # the wire enum `ReplayPreset`


def replay_decimal(replay_id: bytes) -> str:
    """The contract's `$event.replayId` and the stored checkpoint: the bytes read big-endian, in decimal."""
    return str(int.from_bytes(replay_id, "big"))


def replay_bytes(decimal: str) -> bytes:
    """The checkpoint back to the bytes the server gave (8 bytes big-endian, wider only if needed)."""
    number = int(decimal)
    if number < 0:
        raise ValueError("a replay id is not negative")
    return number.to_bytes(max(REPLAY_ID_BYTES, (number.bit_length() + 7) // 8), "big")


@dataclass(frozen=True, slots=True)
class Start:
    """Where a subscription starts: a preset, or CUSTOM after `replay_id`."""

    preset: str
    replay_id: bytes = b""

    def describe(self) -> str:
        return f"after replay id {replay_decimal(self.replay_id)}" if self.preset == CUSTOM else self.preset


def start_for(replay: str, stored: str | None, attempts: int, replay_from: str | None = None) -> Start:
    """Where a launch subscribes from, by the same rule as the CometD listener (`salesforce.start_replay`).

    `resume`: the checkpoint, else LATEST. `new` / `all`: LATEST / EARLIEST at each launch, except that a
    retry within a launch (`attempts` > 0) resumes from the checkpoint, and a resume point set through the
    checkpoint API (`replay_from`: a replay id, `-1` for LATEST, `-2` for EARLIEST) is honoured.
    """
    for point in (replay_from, stored if replay == "resume" or attempts > 0 else None):
        if point is None or not point.lstrip("-").isdigit():
            continue
        if point == "-1":
            return Start(LATEST)
        if point == "-2":
            return Start(EARLIEST)
        if not point.startswith("-"):
            return Start(CUSTOM, replay_bytes(point))
    return Start(EARLIEST if replay == "all" else LATEST)


# ---------------------------------------------------------------- what the core asks the driver to do


@dataclass(frozen=True, slots=True)
class Relogin:
    """The token was refused: log in again (single flight, shared) and subscribe again from where we were."""

    reason: str


@dataclass(frozen=True, slots=True)
class Resubscribe:
    """The replay id was refused: subscribe again from `start`; events in between may be missing."""

    start: Start
    note: str


Action = Relogin | Resubscribe | Retry | Fail


# A status's details as quoted: longer than other servers' words, as gRPC's own connection errors put the
# reason last ("...Tls handshake failed (TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED")
DETAILS_LIMIT = 300


@dataclass(frozen=True, slots=True)
class GrpcError:
    """A stream's end as the driver saw it: the status code's name, its details, Salesforce's trailer code."""

    code: str  # grpc.StatusCode name: "UNAUTHENTICATED", "NOT_FOUND", ...
    details: str = ""
    error_code: str = ""  # trailer `error-code`

    def words(self) -> str:
        """What the server said, for a status message: short and printable, never its raw details."""
        said = self.details or self.code
        said = f"{said} ({self.error_code})" if self.error_code and self.error_code not in said else said
        return sanitised(said, DETAILS_LIMIT)


class Subscription:
    """One listener's Subscribe stream: its start, what it has asked for, what it has seen."""

    def __init__(self, topic: str, start: Start, batch: int, *, fallback: str = EARLIEST, margin: float = 1.2,
                 keepalive: float = KEEPALIVE_INTERVAL):
        self.topic = topic
        self.start = start
        self.batch = max(1, min(batch, MAX_BATCH))
        self.fallback = fallback
        self.keepalive = keepalive
        self.bound = keepalive * margin  # silence past this is a dead stream
        self.owed = 0  # events requested and not yet received
        self.last_replay: bytes | None = None  # the newest event handed on in this run
        self.latest: bytes | None = None  # the server's newest position (keepalives)
        self.relogged = False  # a fresh login was made and no response has come since
        self.answered = False  # the current stream has answered at least once
        self.last_seen = 0.0

    # -- opening a stream

    def open(self, now: float, room: int) -> dict[str, object]:
        """The first FetchRequest of a new stream: topic, start, and the first batch (as much as the outbox takes;
        possibly 0, then the driver tops up once it has room).

        A stream reopened within a run (after a re-login or a dropped stream) resumes after the last
        event handed on, so nothing is skipped and nothing already queued is asked for again.
        """
        start = Start(CUSTOM, self.last_replay) if self.last_replay is not None else self.start
        self.start = start
        self.owed = 0
        self.answered = False
        self.last_seen = now
        return {"topic_name": self.topic, "replay_preset": PRESET_NUMBERS[start.preset],
                "replay_id": start.replay_id, "num_requested": self.top_up(room)}

    # -- what comes back

    def received(self, events: int, latest: bytes, now: float) -> None:
        """A FetchResponse: events (possibly none: a keepalive carrying the newest position).

        What the server still owes is counted here (asked minus received), not read from its
        `pending_num_requested`, so a server that leaves that field out can never make us over-ask.
        """
        self.owed = max(0, self.owed - events)
        if latest:
            self.latest = latest
        self.answered = True
        self.relogged = False
        self.last_seen = now

    def handed_on(self, replay_id: bytes) -> None:
        """An event went to the outbox: a reopened stream resumes after it."""
        self.last_replay = replay_id

    def top_up(self, room: int) -> int:
        """How many more events to ask for now (0: none), given the outbox's `room` (events before its bound).

        Never past one batch owed, never more than the outbox takes: what the server sends always fits.
        """
        if self.owed > self.batch // 2:
            return 0
        more = min(self.batch - self.owed, room - self.owed)
        if more <= 0:
            return 0
        self.owed += more
        return more

    def silent(self, now: float) -> Retry | None:
        """The stream is dead when nothing (not even a keepalive) came for longer than the bound."""
        quiet = now - self.last_seen
        if quiet <= self.bound:
            return None
        return Retry("heartbeat", f"No Pub/Sub API response for {quiet:.1f} s on {self.topic} (a keepalive "
                                  f"is due at least every {self.keepalive:g} s)", delay=0)

    def idle(self, now: float) -> None:
        """Waiting for outbox room is ours, not the server's silence: the clock restarts."""
        self.last_seen = now

    # -- how a stream ended

    def failed(self, error: GrpcError) -> Action:
        words = error.words()
        if error.code == "UNAUTHENTICATED" or error.error_code == AUTH_ERROR:
            if self.relogged:
                return Retry("refused", f"Salesforce refused a fresh session on the Pub/Sub API: {words}")
            self.relogged = True
            return Relogin(words)
        if error.code == "INVALID_ARGUMENT" and "replay" in (error.error_code + " " + error.details).lower():
            if self.start.preset == CUSTOM:
                refused = replay_decimal(self.start.replay_id)
                self.start = Start(self.fallback)
                self.last_replay = None
                what = "all retained events" if self.fallback == EARLIEST else "new events only"
                return Resubscribe(self.start, f"replay id {refused} was refused by Salesforce ({words}): resumed "
                                               f"with {what}; events in between may be missing")
            return Fail(f"Salesforce refused the replay start {self.start.describe()} on {self.topic}: {words}")
        if error.code in ("NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
            return Fail(f"Salesforce refused topic {self.topic}: {words}")
        if error.code == "RESOURCE_EXHAUSTED":
            return Retry("refused", f"Salesforce Pub/Sub API limit on {self.topic}: {words}")
        if error.code == "UNAVAILABLE" and not self.answered:
            return Retry("network", f"Pub/Sub API unavailable: {words}")
        if error.code == "DEADLINE_EXCEEDED":
            return Retry("timeout", f"Pub/Sub API: {words}")
        return Retry("closed", f"Pub/Sub API stream on {self.topic} ended: {words}", delay=0 if self.answered else None)

    def ended(self) -> Retry:
        """The server closed the stream without an error: subscribe again at once, from where we were."""
        return Retry("closed", f"Salesforce closed the Pub/Sub API stream on {self.topic}", delay=0)


# ---------------------------------------------------------------- Change Data Capture bitmaps


def bitmap_fields(schema: dict[str, object], bitmaps: list[str] | None) -> list[str]:
    """Field names from a ChangeEventHeader bitmap list (`changedFields`, `nulledFields`, `diffFields`).

    Salesforce's algorithm ("Event Deserialization Considerations" in the Pub/Sub API guide; its Python
    example `python/util/ChangeEventHeaderUtility.py` and Java `ChangeEventUtils` in forcedotcom/pub-sub-api):
    an entry `0x<hex>` is a bitmap over the record's top-level fields, bit i (counted from the least
    significant bit of the whole number) set meaning field i of the schema; an entry `<i>-0x<hex>` is a
    bitmap over the fields of the compound field at position i (e.g. `BillingAddress`), named
    `Parent.Child`. Entries that do not parse are kept as they are, so nothing is silently lost.
    """
    fields = _record_fields(schema)
    names: list[str] = []
    for entry in bitmaps or []:
        parent, _, bitmap = entry.rpartition("-")
        try:
            number = int(bitmap, 16)
            if parent:
                position = int(parent)
                parent_field = fields[position]
                children = _record_fields(_value_schema(parent_field.get("type")))
                prefix = f"{parent_field['name']}."
            else:
                children, prefix = fields, ""
        except (ValueError, IndexError, KeyError, TypeError):
            names.append(entry)
            continue
        for index, child in enumerate(children):
            if number >> index & 1:
                names.append(prefix + str(child["name"]))
    return names


def _record_fields(schema: object) -> list[dict[str, object]]:
    if isinstance(schema, dict) and schema.get("type") == "record":
        return [f for f in schema.get("fields", []) if isinstance(f, dict)]  # type: ignore[union-attr]
    raise TypeError("not a record")


def _value_schema(field_type: object) -> object:
    """The record inside an optional (`["null", {...}]`) field type, as Salesforce's examples unwrap it."""
    if isinstance(field_type, list):
        records = [t for t in field_type if isinstance(t, dict) and t.get("type") == "record"]
        return records[0] if records else None
    return field_type
