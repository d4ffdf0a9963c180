"""Real recorded Binance messages: the parser takes exactly the selected trade kind and ignores the rest.

Ingest dead-letters a message when the parser raises BadMessage and silently skips it when the parser
returns None, so every known non-trade event (depth, bookTicker, kline, the other trade kind,
subscription replies) must come back as None, never as BadMessage.
"""

import collections
import json
from pathlib import Path

import pytest

from btcfeed.trade import BadMessage, Trade, parse_binance_ws
from btcfeed.wsframes import OP_TEXT, Reassembler
from samples import fragments_with_pings, split_at

RTS = 1_700_000_000_123
MAX = 1 << 20
SHARED_CAPTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "exchange-captures"
# A copy of the shared Binance capture kept in the repository, so the core tests never skip.
LOCAL_CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "binance-spot-combined.jsonl"
SUBSCRIPTION_REPLIES = [b'{"result":null,"id":1}', b'{"result":["btcusdt@trade","btcusdt@aggTrade"],"id":2}']


def shared_capture() -> Path:
    path = SHARED_CAPTURES / "binance-spot-combined.jsonl"
    if not path.exists():
        pytest.skip(f"shared exchange captures not found at {SHARED_CAPTURES} "
                    "(the repository copy is tested)")
    return path


@pytest.fixture(params=["repository copy", "shared"])
def capture(request) -> list:
    path = LOCAL_CAPTURE if request.param == "repository copy" else shared_capture()
    lines = path.read_bytes().splitlines()
    assert lines, f"empty capture {path}"
    return lines


def events_of(lines, kind: str) -> list:
    """The messages of one event type, found without the parser: (line, data object)."""
    found = []
    for line in lines:
        message = json.loads(line)
        data = message.get("data", message)
        if data.get("e") == kind:
            found.append((line, data))
    return found


def symbols_of(lines) -> set:
    return {json.loads(line)["data"]["s"] for line in lines}


def outcome(line, symbol, kind):
    try:
        return parse_binance_ws(line, symbol, RTS, kind=kind)
    except BadMessage as exc:
        return exc


def expected_trade(data, kind: str) -> Trade:
    record_id = data["t"] if kind == "trade" else data["a"]
    return Trade(record_id, data["p"], data["q"], "sell" if data["m"] else "buy", data["T"], RTS)


@pytest.mark.parametrize("kind", ["trade", "aggTrade"])
def test_the_parser_takes_exactly_the_selected_kind(capture, kind):
    for symbol in symbols_of(capture) | {"BTCUSDT"}:
        expected = [expected_trade(data, kind) for _, data in events_of(capture, kind) if data["s"] == symbol]
        got = [outcome(line, symbol, kind) for line in capture]
        trades = [result for result in got if isinstance(result, Trade)]
        assert trades == expected      # id by id; price and quantity strings as the exchange sent them
        for trade, (_, data) in zip(trades, [e for e in events_of(capture, kind) if e[1]["s"] == symbol]):
            assert (trade.p, trade.q) == (data["p"], data["q"])


def test_what_the_capture_holds(capture):
    # The recorded stream is market-data noise around two aggregate trades; no plain trade event.
    kinds = collections.Counter(json.loads(line)["stream"].split("@")[1].split("_")[0] for line in capture)
    assert kinds == {"depth": 177, "bookTicker": 84, "kline": 2, "aggTrade": 2}
    assert events_of(capture, "trade") == []
    assert len(events_of(capture, "aggTrade")) == 2


@pytest.mark.parametrize("kind", ["trade", "aggTrade"])
def test_known_non_trade_events_are_ignored_not_dead_lettered(capture, kind):
    for line in capture + SUBSCRIPTION_REPLIES:
        data = json.loads(line).get("data", {})
        if data.get("e") == kind:
            continue
        for symbol in symbols_of(capture) | {"BTCUSDT"}:
            assert parse_binance_ws(line, symbol, RTS, kind=kind) is None, line[:100]


def test_the_selected_kind_for_another_symbol_is_a_dead_letter(capture):
    # A connection only subscribes to its own symbol: a foreign trade record is suspicious, not noise.
    for line, data in events_of(capture, "aggTrade"):
        with pytest.raises(BadMessage, match="expected BTCUSDT"):
            parse_binance_ws(line, "BTCUSDT", RTS, kind="aggTrade")


def with_trades(lines, symbol: str) -> tuple:
    """The capture with a trade event of the symbol after every fifth message; and those trades."""
    mixed, trades = [], []
    for index, line in enumerate(lines):
        mixed.append(line)
        if index % 5 == 0:
            trade_id = 5_000_000 + len(trades)
            price, qty = f"{43000 + index}.{index:02d}000000", f"0.{index + 1:08d}"
            data = {"e": "trade", "E": 1633998512068 + index, "s": symbol, "t": trade_id, "p": price,
                    "q": qty, "T": 1633998512067 + index, "m": bool(index % 2), "M": True}
            mixed.append(json.dumps({"stream": f"{symbol.lower()}@trade", "data": data},
                                    separators=(",", ":")).encode())
            trades.append(Trade(trade_id, price, qty, "sell" if index % 2 else "buy", data["T"], RTS))
    return mixed, trades


def test_trades_among_the_real_noise_are_taken_exactly(capture):
    mixed, trades = with_trades(capture, "BTCUSDT")
    got = [outcome(line, "BTCUSDT", "trade") for line in mixed]
    assert not [result for result in got if isinstance(result, BadMessage)]
    assert [result for result in got if result is not None] == trades


@pytest.mark.parametrize("read_size", [1 << 18, 4096, 997])
def test_the_capture_through_the_reassembler(capture, read_size):
    """One message per line, several lines per message, fragments with pings: the same documents."""
    mixed, trades = with_trades(capture, "BTCUSDT")
    wire = b""
    for index, line in enumerate(mixed[:100]):
        wire += fragments_with_pings(OP_TEXT, line, [len(line) // 3, len(line) // 2], pings=index % 7 == 0)[0]
    ndjson = b"\n".join(mixed[100:]) + b"\n"
    for message in split_at(ndjson, range(0, len(ndjson), 1500)):
        wire += fragments_with_pings(OP_TEXT, message, [], pings=False)[0]
    reassembler, documents = Reassembler(MAX), []
    for start in range(0, len(wire), read_size):
        documents += [payload for opcode, payload in reassembler.feed(wire[start:start + read_size])
                      if opcode == OP_TEXT]
    assert documents == mixed
    assert [t for t in (outcome(doc, "BTCUSDT", "trade") for doc in documents) if t is not None] == trades
    assert reassembler.connection_lost() is None


def test_the_repository_copy_is_the_shared_capture():
    assert LOCAL_CAPTURE.read_bytes() == shared_capture().read_bytes()
