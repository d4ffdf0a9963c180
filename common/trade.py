"""The normalized trade record and the Binance message parsers that produce it."""

import re
from typing import NamedTuple, Optional, Tuple

import orjson

from btcfeed.wsframes import OP_BINARY, OP_TEXT

# Quantities are summed into candles as integers of 1e-8 (the finest step Binance, Coinbase and
# Kraken use for BTC), so volumes stay exact however a replay orders the trades.
QTY_DECIMALS = 8
# Ids, times and quantities in 1e-8 units travel as JSON numbers into the Lua apply script, whose
# numbers are doubles: they stay exact below 2^53. Quantities are bounded to 7 whole digits
# (under 10 million BTC in one trade) so that even a minute's sum stays far below that.
MAX_EXACT_INT = 2 ** 53
MAX_QTY_WHOLE_DIGITS = 7
# Used with fullmatch: "$" alone would also accept a trailing newline.
DECIMAL = re.compile(r"[0-9]{1,20}(\.[0-9]{1,20})?")
# Binance stream events that are valid but carry no trade for us.
BINANCE_NON_TRADE_EVENTS = frozenset(("depthUpdate", "kline", "aggTrade", "24hrTicker", "24hrMiniTicker",
                                      "bookTicker", "outboundAccountPosition"))
# The spot bookTicker stream sends its updates without an "e" field.
BINANCE_BOOK_TICKER_KEYS = frozenset(("u", "s", "b", "B", "a", "A"))


class BadMessage(ValueError):
    """A message that must not become a trade; the text is the dead-letter reason."""


class MalformedJSON(BadMessage):
    """The message is not one JSON document (it may hold several, or part of one: see MessageSplitter)."""


class Trade(NamedTuple):
    id: int
    p: str      # price, the exchange's decimal string
    q: str      # quantity, the exchange's decimal string
    side: str   # taker side: "buy" or "sell"
    ts: int     # exchange trade time, ms
    rts: int    # receive time at ingest, ms

    def fields(self) -> dict:
        return {"id": str(self.id), "p": self.p, "q": self.q, "side": self.side,
                "ts": str(self.ts), "rts": str(self.rts)}


def qty_units(qty: str) -> int:
    """The quantity as an integer count of 1e-8 (validated trades never have finer digits)."""
    whole, _, frac = qty.partition(".")
    units = int(frac[:QTY_DECIMALS].ljust(QTY_DECIMALS, "0")) if frac else 0
    return int(whole) * 10 ** QTY_DECIMALS + units


def check_decimal(name: str, value) -> str:
    # The hot path of ingest: one regex and one strip per value.
    if value.__class__ is not str or not DECIMAL.fullmatch(value):
        raise BadMessage(f"{name} is not a decimal string: {value!r:.40}")
    if not value.strip("0."):
        raise BadMessage(f"{name} is zero")
    return value


# Quantities that pass every check of check_qty at once (at most 7 significant whole digits, any
# digit past the eighth decimal a zero, at most 20 digits each side); anything else takes the slow
# path, which finds the reason.
PLAIN_QTY = re.compile(r"0{0,13}[0-9]{1,7}(\.[0-9]{1,8}0{0,12})?")


def check_qty(value) -> str:
    if value.__class__ is str and PLAIN_QTY.fullmatch(value) and value.strip("0."):
        return value
    check_decimal("qty", value)
    dot = value.find(".")
    if (value[:dot] if dot >= 0 else value).lstrip("0").__len__() > MAX_QTY_WHOLE_DIGITS:
        raise BadMessage(f"qty is implausibly large: {value:.40}")
    if dot >= 0 and len(value) - dot - 1 > QTY_DECIMALS and value[dot + 1 + QTY_DECIMALS:].strip("0"):
        raise BadMessage(f"qty has more than {QTY_DECIMALS} decimals: {value}")
    return value


def check_int(name: str, value) -> int:
    # bool is an int subclass in Python; a JSON true is never a valid id or time.
    if type(value) is not int or value < 0:
        raise BadMessage(f"{name} is not a non-negative integer: {value!r:.40}")
    if value >= MAX_EXACT_INT:
        raise BadMessage(f"{name} is beyond what the apply script keeps exact: {value!r:.40}")
    return value


def check_bool(name: str, value) -> bool:
    if type(value) is not bool:
        raise BadMessage(f"{name} is not a boolean: {value!r:.40}")
    return value


def side_from_buyer_maker(buyer_is_maker: bool) -> str:
    # When the buyer was the resting (maker) order, the taker sold.
    return "sell" if buyer_is_maker else "buy"


# The two Binance record kinds a source can follow: every trade ("trade", ids "t") or aggregate
# trades ("aggTrade": one record per taker order and price, aggregate ids "a", also consecutive, so
# gap detection and backfill work the same; REST counterpart /api/v3/aggTrades?fromId=).
BINANCE_KINDS = ("trade", "aggTrade")
BINANCE_RECORD_ID_FIELD = {"trade": "t", "aggTrade": "a"}
BINANCE_REST_ID_FIELD = {"trade": "id", "aggTrade": "a"}


class ServerShutdown(NamedTuple):
    """Binance's notice that the server is about to close the connection (for maintenance)."""
    time: object


def parse_binance_ws(raw, symbol: str, rts: int, kind: str = "trade") -> Optional[Trade]:
    """A trade from one Binance stream message; None for valid messages that are not trades; a
    ServerShutdown for the notice that the server will soon close the connection.

    kind selects which record kind becomes a Trade ("trade" or "aggTrade"); the other kind is
    valid noise like depth or kline updates.
    """
    if kind not in BINANCE_KINDS:
        raise ValueError(f"unknown Binance record kind {kind!r} (supported: {', '.join(BINANCE_KINDS)})")
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:   # also invalid UTF-8 and absurdly deep nesting
        raise MalformedJSON(f"malformed JSON: {exc}")
    if not isinstance(message, dict):
        raise BadMessage("message is not a JSON object")
    if "stream" in message and "data" in message:
        message = message["data"]
        if not isinstance(message, dict):
            raise BadMessage("combined stream data is not a JSON object")
    event = message.get("e")
    if event == "serverShutdown":
        return ServerShutdown(message.get("E"))
    if event == kind:
        if message.get("s") != symbol:
            raise BadMessage(f"{kind} for symbol {message.get('s')!r:.20}, expected {symbol}")
        if kind == "trade":
            return _binance_trade(message, rts)
        return binance_agg_trade(message, rts)
    # isinstance first: an "e" that is a JSON array or object is unhashable.
    if isinstance(event, str) and (event in BINANCE_NON_TRADE_EVENTS or event in BINANCE_KINDS):
        return None
    if "result" in message and "id" in message:  # reply to a SUBSCRIBE or LIST_SUBSCRIPTIONS request
        return None
    if event is None and BINANCE_BOOK_TICKER_KEYS <= message.keys():
        return None
    raise BadMessage("unknown message shape")


def _binance_trade(message: dict, rts: int) -> Trade:
    trade_id, price, qty = message.get("t"), message.get("p"), message.get("q")
    buyer_is_maker, trade_time = message.get("m"), message.get("T")
    # The common case in one expression (the same checks as below, without a call per field);
    # anything it does not accept goes through the field checks, which name the reason.
    if (type(trade_id) is int and 0 <= trade_id < MAX_EXACT_INT and type(trade_time) is int
            and 0 <= trade_time < MAX_EXACT_INT and (buyer_is_maker is True or buyer_is_maker is False)
            and price.__class__ is str and DECIMAL.fullmatch(price) and price.strip("0.")
            and qty.__class__ is str and PLAIN_QTY.fullmatch(qty) and qty.strip("0.")):
        # tuple.__new__ skips the Python-level __new__ of the named tuple: the same Trade, cheaper.
        side = "sell" if buyer_is_maker else "buy"
        return tuple.__new__(Trade, (trade_id, price, qty, side, trade_time, rts))
    return Trade(
        check_int("trade id", trade_id),
        check_decimal("price", price),
        check_qty(qty),
        side_from_buyer_maker(check_bool("buyer-maker flag", buyer_is_maker)),
        check_int("trade time", trade_time),
        rts)


def binance_agg_trade(item: dict, rts: int) -> Trade:
    """An aggregate trade (stream event or /api/v3/aggTrades row: same short keys) as a Trade."""
    first = check_int("first trade id", item.get("f"))
    if check_int("last trade id", item.get("l")) < first:
        raise BadMessage("aggregate trade's last trade id is before its first")
    return Trade(
        check_int("aggregate trade id", item.get("a")),
        check_decimal("price", item.get("p")),
        check_qty(item.get("q")),
        side_from_buyer_maker(check_bool("buyer-maker flag", item.get("m"))),
        check_int("trade time", item.get("T")),
        rts)


def parse_binance_rest(item, rts: int, kind: str = "trade") -> Trade:
    """A trade from one element of GET /api/v3/historicalTrades (or /api/v3/aggTrades for "aggTrade")."""
    if not isinstance(item, dict):
        raise BadMessage("REST trade is not a JSON object")
    if kind == "aggTrade":
        return binance_agg_trade(item, rts)
    if kind != "trade":
        raise ValueError(f"unknown Binance record kind {kind!r} (supported: {', '.join(BINANCE_KINDS)})")
    return Trade(
        check_int("trade id", item.get("id")),
        check_decimal("price", item.get("price")),
        check_qty(item.get("qty")),
        side_from_buyer_maker(check_bool("buyer-maker flag", item.get("isBuyerMaker"))),
        check_int("trade time", item.get("time")),
        rts)


def parse_binance_rest_agg(item, rts: int) -> Trade:
    """A trade from one element of GET /api/v3/aggTrades: {"a","p","q","f","l","T","m","M"}."""
    return parse_binance_rest(item, rts, "aggTrade")


def binance_cut_record_id(sample: Optional[dict], symbol: str, kind: str = "trade") -> Optional[int]:
    """The id of the record a lost connection cut, from a sample_prefix() result; None if unknown.

    Only a sample that names the followed kind and symbol counts, so a cut depth or kline update
    (whose nested "t" is a time) never steers a backfill.
    """
    if not sample or sample.get("e") != kind or sample.get("s") != symbol:
        return None
    record_id = sample.get(BINANCE_RECORD_ID_FIELD[kind])
    if type(record_id) is not int or not 0 <= record_id < MAX_EXACT_INT:
        return None
    return record_id


# The bus carries a batch of one source's trades per entry as one compact JSON array of
# [id, p, q, side, ts, rts, qty units]; the apply script reads the same text unchanged.
def encode_batch(trades) -> bytes:
    return orjson.dumps([(*t, qty_units(t.q)) for t in trades])


def decode_batch(payload) -> list:
    return [Trade(*row[:6]) for row in orjson.loads(payload)]


def parse_socket_read(reassembler, data: bytes, parse, *args) -> Tuple[list, list, list]:
    """One socket read through the reassembler and a parser: (results, rejects, control frames).

    parse(payload, *args) returns a result (a Trade, or whatever an exchange adapter returns) or
    None, or raises BadMessage; e.g. parse_socket_read(r, data, parse_binance_ws, symbol, rts).
    results are the non-None results in arrival order; rejects are (reason, raw) for dead letters;
    control frames are (opcode, payload) in arrival order. A message holding one document is parsed
    without a scan; one on which parse raises MalformedJSON (the decode failed: several documents,
    or one cut at the end of the message) is split into its documents, a cut last one kept for the
    next message. A parser that raises plain BadMessage on a decode error gets no splitting.
    """
    results, rejects, controls = [], [], []
    documents = reassembler.documents
    for opcode, payload in reassembler.frames.feed(data):
        if opcode != OP_TEXT:
            if opcode == OP_BINARY:
                rejects.append(("binary frame", payload))
            else:
                controls.append((opcode, payload))
            continue
        if documents.buf or 0x0A in payload:
            # A document continues from an earlier message, or newline-delimited documents: split.
            _parse_documents(documents.feed_message(payload), parse, args, results, rejects)
            continue
        try:
            result = parse(payload, *args)
        except MalformedJSON:   # not one document: several, or one cut at the end of the message
            _parse_documents(documents.feed_message(payload), parse, args, results, rejects)
            continue
        except BadMessage as exc:
            rejects.append((str(exc), payload))
            continue
        if result is not None:
            results.append(result)
    return results, rejects, controls


def _parse_documents(documents, parse, args, results: list, rejects: list) -> None:
    for document in documents:
        try:
            result = parse(document, *args)
        except BadMessage as exc:
            rejects.append((str(exc), document))
            continue
        if result is not None:
            results.append(result)
