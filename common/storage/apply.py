"""The one idempotent write of trades into a Redis with the primary's layout (DESIGN.md §2, §3)."""

import datetime
import logging
import os
import zlib
from decimal import Decimal
from typing import Dict, Iterable, Iterator, List, Sequence

from redis.exceptions import (ClusterDownError, ClusterError, ConnectionError, NoScriptError, RedisError,
                              ResponseError, TimeoutError)

from btcfeed import keys
from btcfeed.trade import Trade, decode_batch, encode_batch, qty_units

SCRIPT_PATH = os.path.join(os.path.dirname(__file__), "apply_batch.lua")
# Candle hashes outlive the retention window by this much (the script's floor follows the candle
# index, not the hashes, so this only bounds memory).
CANDLE_TTL_MARGIN_S = 3600
# The prefix of the script's refusal when the primary does not hold the epoch the feed host expects.
EPOCH_ERROR = "BTCFEED-EPOCH"
# An epoch that no primary holds: the first write to a primary whose epoch is not known yet fails.
UNKNOWN_EPOCH = "unknown"
# How the script writes the seen-set: SETRANGE (one command a segment), or BITFIELD (one operation a
# trade) where the primary's ACL does not allow SETRANGE (deployment/primary-acl.conf before it).
SEEN_BY_SETRANGE, SEEN_BY_BITFIELD = "setrange", "bitfield"
# How Redis words a command a script may not run under the caller's ACL (7.0; later releases).
SCRIPT_ACL_REFUSALS = ("can't run this command", "NOPERM", "no permissions to run")
log = logging.getLogger("btcfeed.apply")


def is_epoch_error(exc: Exception) -> bool:
    """Whether a Redis error is the apply script's refusal of a primary that lost btcfeed's data."""
    return isinstance(exc, ResponseError) and EPOCH_ERROR in str(exc)


# Refusals that concern one source's keys only (the script stops before its first write on them): a
# key of the wrong type, or the source's slot moving between Cluster nodes. The other sources go on.
SOURCE_REFUSALS = ("WRONGTYPE", "non local key", "TRYAGAIN", "ASK ", "MOVED ", "TTL exhausted")


def is_source_refusal(exc: Exception) -> bool:
    """Whether a Redis error refuses one source's batch while the primary itself is fine."""
    if isinstance(exc, (ClusterDownError, ConnectionError, TimeoutError)) or is_epoch_error(exc):
        return False
    return (isinstance(exc, (ResponseError, ClusterError))
            and any(text in str(exc) for text in SOURCE_REFUSALS))


def load_script_source() -> str:
    with open(SCRIPT_PATH) as handle:
        return handle.read()


class BatchApplier:
    """Builds and runs the apply script for batches of one source's trades."""

    def __init__(self, client, retention_ms: int, compat_source: str = None, compat_history_len: int = 1000,
                 publish: bool = True, epochs: Dict[str, str] = None):
        # register_script runs EVALSHA and loads the script on NOSCRIPT (a restarted primary).
        self.script = client.register_script(load_script_source())
        self.client = client
        self.retention_ms = retention_ms
        self.compat_source = compat_source
        self.compat_history_len = compat_history_len
        # The local failover copy keeps the same data but has no subscribers to publish to.
        self.publish = publish
        # source -> the epoch the primary must hold (kept up to date by the owner); None: no check.
        self.epochs = epochs
        # A DedicatedConnection of `client` for apply_many, set by the writer (None: a pipeline).
        self.round_trips = None
        self.seen_writes = SEEN_BY_SETRANGE

    def apply(self, source: str, payload: str, client=None):
        """Run (or queue on a pipeline) one apply of a bus payload; the reply is [applied, skipped,
        floored]."""
        for attempt in (1, 2):
            keys_, args = self.script_arguments(source, payload)
            try:
                return self.script(keys=keys_, args=args, client=client)
            except ResponseError as exc:
                if attempt == 2 or not self.fell_back_to_bitfield(client or self.client, [exc], source):
                    raise

    def apply_many(self, batches: Sequence, client=None, raise_on_error: bool = True,
                   then: Sequence = ()) -> list:
        """Apply (source, payload) batches in one pipelined round trip; one [applied, skipped, floored] each
        (or, with raise_on_error False, the error of a batch the server refused, in its place). The
        commands in `then` (argument tuples, idempotent) follow in the same round trip; their
        replies are not returned.

        EVALSHA is sent directly (not through redis-py's pipeline script loading, which costs a
        SCRIPT EXISTS round trip per call); a server that lost its scripts gets the script loaded
        and the whole pipeline again, which is harmless because every apply is idempotent.
        """
        client = client or self.client
        script_lost = 0
        while True:
            commands = []
            for source, payload in batches:
                script_keys, args = self.script_arguments(source, payload)
                commands.append(("EVALSHA", self.script.sha, len(script_keys), *script_keys, *args))
            commands += then
            try:
                replies = self._send(client, commands, raise_on_error=False)
            except NoScriptError:
                replies = [NoScriptError()]
            results = replies[:len(batches)]
            if any(isinstance(result, NoScriptError) for result in results):
                script_lost += 1
                if script_lost == 2:
                    raise NoScriptError("the server lost the apply script twice")
                client.script_load(self.script.script)
                continue
            if batches and self.fell_back_to_bitfield(client, results, batches[0][0]):
                continue        # the refused batches wrote nothing: the script stops at the refusal
            if raise_on_error:
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
            return results

    def fell_back_to_bitfield(self, client, results, source: str) -> bool:
        """Whether a refusal among `results` was the primary's ACL refusing SETRANGE to the script
        (the recipe from before it was listed): if so, seen bits go by BITFIELD from now on and the
        caller sends again. Asked with an empty SETRANGE on a key that does not exist, which writes
        nothing; a refusal of anything else is left to the caller."""
        if self.seen_writes != SEEN_BY_SETRANGE or not any(
                isinstance(result, ResponseError) and any(text in str(result) for text in SCRIPT_ACL_REFUSALS)
                for result in results):
            return False
        try:
            client.execute_command("SETRANGE", keys.setrange_probe(source), 0, "")
            return False
        except ResponseError as exc:
            if not any(text in str(exc) for text in SCRIPT_ACL_REFUSALS):
                return False
        except RedisError:
            return False
        self.seen_writes = SEEN_BY_BITFIELD
        log.warning("the primary's ACL refuses SETRANGE: the seen-set is written with BITFIELD (more CPU "
                    "a trade); add +setrange to the btcfeed user (deployment/primary-acl.conf)")
        return True

    def _send(self, client, commands, raise_on_error: bool = False) -> list:
        """The commands in one round trip: on the dedicated connection when the applier has one and
        the client is its own (storage/dedicated.py), else in a redis-py pipeline."""
        if self.round_trips is None or client is not self.client:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                # execute_command, not pipe.evalsha: a Redis Cluster pipeline refuses the latter
                # but routes the former by its first key (a source's keys share one slot).
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=raise_on_error)
        replies = self.round_trips.call_many(commands)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    def queue_in_transaction(self, pipe, source: str, payload) -> None:
        """Queue one apply inside MULTI: EVAL (not EVALSHA), so a lost script cache cannot fail half a
        transaction."""
        script_keys, args = self.script_arguments(source, payload)
        pipe.eval(self.script.script, len(script_keys), *script_keys, *args)

    def apply_trades(self, source: str, trades: Sequence[Trade], client=None):
        return self.apply(source, encode_batch(trades), client)

    def script_arguments(self, source: str, payload):
        compat = source == self.compat_source
        script_keys = keys.primary_keys(source)
        if compat:
            script_keys += [keys.COMPAT_LAST_PRICE, keys.COMPAT_LAST_UPDATE, keys.COMPAT_HISTORY]
        epoch = "" if self.epochs is None else self.epochs.get(source) or UNKNOWN_EPOCH
        args = [keys.seen_prefix(source), keys.candle_prefix(source),
                keys.live_channel(source) if self.publish else "",
                self.retention_ms, self.retention_ms // 1000 + CANDLE_TTL_MARGIN_S,
                keys.COMPAT_CHANNEL if compat and self.publish else "", self.compat_history_len, epoch,
                payload, self.seen_writes]
        return script_keys, args


def iso_time(ms: int) -> str:
    """The same ISO 8601 text the apply script writes to last_btc_update_time."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)


def expected_candles(trades: Iterable[Trade]) -> Dict[int, dict]:
    """1-minute candles recomputed from scratch, as the apply script must leave them."""
    candles: Dict[int, dict] = {}
    for trade in trades:
        minute = trade.ts // 60000 * 60000
        c = candles.get(minute)
        if c is None:
            c = candles[minute] = {"t": minute, "n": 0, "vu": 0, "fid": trade.id, "o": trade.p,
                                   "lid": trade.id, "c": trade.p, "h": trade.p, "l": trade.p}
        c["n"] += 1
        c["vu"] += qty_units(trade.q)
        if trade.id < c["fid"]:
            c["fid"], c["o"] = trade.id, trade.p
        if trade.id > c["lid"]:
            c["lid"], c["c"] = trade.id, trade.p
        if Decimal(trade.p) > Decimal(c["h"]):
            c["h"] = trade.p
        if Decimal(trade.p) < Decimal(c["l"]):
            c["l"] = trade.p
    for c in candles.values():
        c["v"] = "%d.%08d" % divmod(c["vu"], 10 ** 8)
    return candles


def read_candles(client, source: str) -> Dict[int, dict]:
    """All candles of a source in a Redis with the primary's layout, values normalized to int/str."""
    minutes = [int(m) for m in client.zrange(keys.candles_index(source), 0, -1)]
    pipe = client.pipeline(transaction=False)
    for minute in minutes:
        pipe.hgetall(keys.candle(source, minute))
    result = {}
    for minute, raw in zip(minutes, pipe.execute()):
        c = {_text(k): _text(v) for k, v in raw.items()}
        for name in ("t", "n", "vu", "fid", "lid"):
            c[name] = int(c[name])
        result[minute] = c
    return result


def read_trades_since(client, source: str, chunk: int = 10000, start: str = "-") -> Iterator[List[Trade]]:
    """A source's trade stream in stream order, chunk by chunk."""
    while True:
        entries = client.xrange(keys.trades(source), min=start, max="+", count=chunk)
        if not entries:
            return
        yield [trade_from_fields(fields) for _, fields in entries]
        start = "(" + _text(entries[-1][0])


def read_local_copy(client, source: str, chunk: int = 10000, start: str = "-") -> Iterator[List[Trade]]:
    """Every trade the local Redis holds for a source: the mirrored batches (primary healthy) and
    the local trade stream (written in failover). Order is not meaningful; duplicates are possible
    (a batch delivered twice), which every reader tolerates (the apply is idempotent)."""
    for _, trades in read_mirror_since(client, source, start=start):
        yield trades
    yield from read_trades_since(client, source, chunk, start=start)


def compressed_batch(payload: bytes) -> dict:
    """A batch as the local Redis keeps it in the mirror, the read view and the backlog: compressed (fast
    level), since it is only read back by Python and it is most of what the local Redis holds."""
    return {"z": zlib.compress(payload, 1)}


def batch_payload(fields: dict) -> bytes:
    """The bus payload of an entry that holds one batch: compressed (compressed_batch), or plain in an
    entry written before the local Redis compressed it."""
    return zlib.decompress(fields[b"z"]) if b"z" in fields else fields[b"t"]


def read_mirror_since(client, source: str, start: str = "-", count: int = 64):
    """(entry time ms, trades) of each mirrored batch from start on."""
    while True:
        entries = client.xrange(keys.mirror(source), min=start, max="+", count=count)
        if not entries:
            return
        for entry_id, fields in entries:
            yield int(_text(entry_id).partition("-")[0]), decode_batch(batch_payload(fields))
        start = "(" + _text(entries[-1][0])


def read_trades(client, source: str) -> List[Trade]:
    """Every trade in a source's trade stream, in stream order."""
    return [trade for chunk in read_trades_since(client, source) for trade in chunk]


def trade_from_fields(fields) -> Trade:
    f = {_text(k): _text(v) for k, v in fields.items()}
    return Trade(int(f["id"]), f["p"], f["q"], f["side"], int(f["ts"]), int(f["rts"]))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
