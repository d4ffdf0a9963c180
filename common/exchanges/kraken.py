"""Kraken spot: the v2 websocket `trade` channel and REST public Trades.

Kraken v2 sends prices and quantities as JSON numbers. They are read as their literal text (never
through a float, which would round them) and normalized to the shortest exact decimal string, the
same string the REST answer's "30243.40000" normalizes to, so a trade reads the same whichever way
it arrived. `side` is the taker's side. Trade ids are consecutive per pair (gap detection); the
heartbeat carries no id, so a gap in a quiet market shows with the next trade. REST Trades pages
forward by time: `since` is a nanosecond timestamp, the answer's `last` is where the next page starts.
"""

import json
import time
import urllib.parse
from typing import NamedTuple, Optional

from btcfeed.exchanges.base import (Heartbeat, RateLimited, RequestPacer, RestError, TradePage, RestClient,
                             iso_to_ms, parse_rows, strictly_ascending)
from btcfeed.trade import DECIMAL, BadMessage, MalformedJSON, Trade, check_decimal, check_int, check_qty
from btcfeed.wsframes import Reassembler

DEFAULT_WS_URL = "wss://ws.kraken.com/v2"
DEFAULT_REST_URL = "https://api.kraken.com"
REST_PAGE_LIMIT = 1000          # `count` is at most 1000
# Kraken's public REST limit is about one call per second with a small burst; a refused call is
# answered with an "EGeneral:Too many requests" error (HTTP 200) and costs more of the budget.
REST_PER_SECOND = 1.0
REST_BURST = 3.0
RATE_LIMIT_ERRORS = ("Too many requests", "Rate limit exceeded")
RATE_LIMIT_WAIT_S = 2.0
# Heartbeats come every second once subscribed: ten silent seconds mean a dead connection.
STALE_AFTER_S = 10.0
# Where to look for a trade whose time is unknown (after a restart): this far back first, then
# four times further each try, up to a month.
SEARCH_FIRST_LOOKBACK_S = 60
SEARCH_MAX_LOOKBACK_S = 31 * 86400
# Pages read past in one call when they hold only trades before the one asked for.
MAX_PAGES_BEFORE_START = 100
NON_TRADE_CHANNELS = frozenset(("status", "book", "ticker", "ohlc", "instrument", "level3", "executions",
                                "balances"))
ACK_METHODS = frozenset(("subscribe", "unsubscribe", "pong"))
TAKER_SIDE_V2 = {"buy": "buy", "sell": "sell"}
TAKER_SIDE_REST = {"b": "buy", "s": "sell"}
# Kraken calls bitcoin XBT in REST pair names (BTC/USD is XBTUSD there).
REST_ASSET_NAMES = {"BTC": "XBT"}
V1_EVENTS = frozenset(("heartbeat", "systemStatus", "subscriptionStatus", "pong"))


class RawNumber(str):
    """A JSON number kept as the text it was written as."""


def _reject_constant(name):
    raise BadMessage(f"{name} is not a JSON number Kraken sends")


def loads_exact(raw):
    """JSON with every number as its RawNumber text: no float ever touches a price or quantity."""
    try:
        return json.loads(raw, parse_float=RawNumber, parse_int=RawNumber, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:   # also invalid UTF-8, NaN and Infinity
        # MalformedJSON: the message may hold several documents (or a cut one) that can be split.
        raise MalformedJSON(f"malformed JSON: {str(exc)[:80]}")


def normalized_decimal(text: str) -> str:
    """The shortest exact form: trailing fraction zeros (and a bare dot) dropped, integers kept."""
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def exact_decimal(name: str, value, allow_string: bool = False) -> str:
    """A plain decimal text from a JSON number (or, in REST, a string), normalized; BadMessage otherwise."""
    if value.__class__ is RawNumber or (allow_string and value.__class__ is str):
        text = str.__str__(value)
        if DECIMAL.fullmatch(text):
            return normalized_decimal(text)
    raise BadMessage(f"{name} is not a plain decimal number: {value!r:.40}")


def exact_int(name: str, value) -> int:
    if value.__class__ is not RawNumber or not str.isdigit(value):
        raise BadMessage(f"{name} is not a non-negative integer: {value!r:.40}")
    return check_int(name, int(value))


def seconds_to_ms(name: str, value, allow_string: bool = False) -> int:
    """Unix seconds with a fraction (REST and v1 times) to ms, exactly (sub-ms digits dropped)."""
    text = exact_decimal(name, value, allow_string) if value.__class__ in (RawNumber, str) else None
    if text is None:
        raise BadMessage(f"{name} is not a number of seconds: {value!r:.40}")
    whole, _, fraction = text.partition(".")
    return check_int(name, int(whole) * 1000 + int(fraction[:3].ljust(3, "0")))


def rest_pair(symbol: str) -> str:
    """BTC/USD -> XBTUSD, the name REST Trades takes."""
    return "".join(REST_ASSET_NAMES.get(part, part) for part in symbol.split("/"))


# --- websocket v2 -------------------------------------------------------------------------------

def subscribe_message(symbol: str) -> bytes:
    return json.dumps({"method": "subscribe",
                       "params": {"channel": "trade", "symbol": [symbol], "snapshot": False}},
                      separators=(",", ":")).encode()


def trade_from_v2(item, symbol: str, rts: int) -> Trade:
    if not isinstance(item, dict):
        raise BadMessage("trade is not a JSON object")
    if item.get("symbol") != symbol:
        raise BadMessage(f"trade for symbol {item.get('symbol')!r:.20}, expected {symbol}")
    side = item.get("side")
    if side.__class__ is not str or side not in TAKER_SIDE_V2:
        raise BadMessage(f"side is not buy or sell: {side!r:.20}")
    return Trade(
        exact_int("trade id", item.get("trade_id")),
        check_decimal("price", exact_decimal("price", item.get("price"))),
        check_qty(exact_decimal("qty", item.get("qty"))),
        TAKER_SIDE_V2[side],
        iso_to_ms("trade time", item.get("timestamp")),
        rts)


def parse_ws(raw, symbol: str, rts: int):
    """A list of Trades (ids ascending), a Heartbeat or None from one v2 message; BadMessage otherwise."""
    message = loads_exact(raw)
    if isinstance(message, list):
        raise BadMessage("a Kraken v1 message on a v2 connection (v1 trades carry no ids)")
    if not isinstance(message, dict):
        raise BadMessage("message is not a JSON object")
    channel = message.get("channel")
    if channel == "trade":
        if message.get("type") not in ("update", "snapshot"):
            raise BadMessage(f"trade message of type {message.get('type')!r:.20}")
        data = message.get("data")
        if not isinstance(data, list):
            raise BadMessage("trade data is not a list")
        trades = [trade_from_v2(item, symbol, rts) for item in data]
        if not strictly_ascending(trades):
            raise BadMessage("trade ids in one message are not strictly ascending")
        return trades or None
    if channel == "heartbeat":
        return Heartbeat(None)
    if isinstance(channel, str) and channel in NON_TRADE_CHANNELS:
        return None
    method = message.get("method")
    if isinstance(method, str) and method in ACK_METHODS:
        if message.get("success") is False:
            raise BadMessage(f"exchange error on {method}: {str(message.get('error'))[:120]}")
        return None
    raise BadMessage("unknown message shape")


# --- websocket v1 (recorded captures; no trade ids, so never a live source) --------------------

class V1Trade(NamedTuple):
    p: str
    q: str
    side: str
    ts: int


def parse_v1(raw, pair: str) -> Optional[list]:
    """V1Trades from a v1 `trade` message for pair, None for events; BadMessage otherwise."""
    message = loads_exact(raw)
    if isinstance(message, dict):
        if message.get("event") in V1_EVENTS and message.get("status") != "error":
            return None
        raise BadMessage("unknown v1 event")
    if not (isinstance(message, list) and len(message) == 4 and message[2] == "trade"
            and isinstance(message[1], list)):
        raise BadMessage("unknown v1 message shape")
    if message[3] != pair:
        raise BadMessage(f"v1 trade for pair {message[3]!r:.20}, expected {pair}")
    trades = []
    for row in message[1]:
        if not isinstance(row, list) or len(row) < 4:
            raise BadMessage("v1 trade row is not [price, volume, time, side, ...]")
        side = TAKER_SIDE_REST.get(row[3]) if row[3].__class__ is str else None
        if side is None:
            raise BadMessage(f"v1 side is not b or s: {row[3]!r:.10}")
        trades.append(V1Trade(check_decimal("price", exact_decimal("price", row[0], True)),
                              check_qty(exact_decimal("volume", row[1], True)), side,
                              seconds_to_ms("trade time", row[2], True)))
    return trades


# --- REST ---------------------------------------------------------------------------------------

def trade_from_rest_row(row, rts: int) -> Trade:
    """[price, volume, time, side, order type, misc, trade_id] with price and volume as strings."""
    if not isinstance(row, list) or len(row) < 7:
        raise BadMessage("REST trade row is not [price, volume, time, side, type, misc, trade_id]")
    side = TAKER_SIDE_REST.get(row[3]) if row[3].__class__ is str else None
    if side is None:
        raise BadMessage(f"REST side is not b or s: {row[3]!r:.10}")
    return Trade(
        exact_int("trade id", row[6]),
        check_decimal("price", exact_decimal("price", row[0], allow_string=True)),
        check_qty(exact_decimal("volume", row[1], allow_string=True)),
        side,
        seconds_to_ms("trade time", row[2]),
        rts)


class RestPage(NamedTuple):
    trades: list        # ascending ids
    last_ns: int        # the answer's `last`: where the next page starts
    rows: int           # rows in the answer (before any filtering)


def rest_row_id(row):
    """The trade id of a REST row, for a row refused for another reason."""
    return exact_int("trade id", row[6])


def parse_rest_answer(body, rts: int, rejected: list = None) -> RestPage:
    """One Trades answer. A bad row refuses the whole answer, or with a rejected list goes there
    (common.exchange.RejectedRow) and the other rows are kept."""
    if not isinstance(body, dict):
        raise BadMessage("Trades answer is not a JSON object")
    errors = body.get("error")
    if errors:
        text = "; ".join(str(e) for e in errors)[:200] if isinstance(errors, list) else str(errors)[:200]
        if any(marker in text for marker in RATE_LIMIT_ERRORS):
            raise RateLimited(RATE_LIMIT_WAIT_S, 200)
        raise RestError(f"Kraken error: {text}")
    result = body.get("result")
    if not isinstance(result, dict):
        raise BadMessage("Trades answer has no result object")
    pairs = [key for key in result if key != "last"]
    if len(pairs) != 1 or not isinstance(result[pairs[0]], list):
        raise BadMessage(f"Trades result has pairs {pairs[:3]!r}, expected one")
    last = result.get("last")
    if last.__class__ not in (str, RawNumber) or not str.isdigit(last):
        raise BadMessage(f"Trades `last` is not a nanosecond timestamp: {last!r:.30}")
    rows = result[pairs[0]]
    trades = parse_rows(rows, lambda row: trade_from_rest_row(row, rts), rest_row_id, rejected)
    if not strictly_ascending(trades):
        raise BadMessage("REST trade ids are not strictly ascending")
    return RestPage(trades, int(last), len(rows))


class KrakenAdapter:
    exchange = "kraken"
    id_space = "trade"             # one kind of record, one id sequence per pair
    page_limit = REST_PAGE_LIMIT
    pages_by_time = True           # REST pages start at a time, not an id
    stale_after_s = STALE_AFTER_S

    def __init__(self, symbol: str, ws_url: str = DEFAULT_WS_URL, rest_url: str = DEFAULT_REST_URL):
        self.symbol = symbol
        self.ws_url = ws_url
        self.rest_url = rest_url.rstrip("/")
        self.rest = RestClient(self.rest_url)
        self.pair = rest_pair(symbol)
        self.pacer = RequestPacer(REST_PER_SECOND, REST_BURST)
        self._resume = None         # (next id, since ns) left by the previous page

    def subscribe_messages(self) -> list:
        return [subscribe_message(self.symbol)]

    def parse(self, raw, rts: int):
        return parse_ws(raw, self.symbol, rts)

    def rest_pause_s(self) -> float:
        return self.pacer.pause_s()

    def close(self) -> None:
        self.rest.close()

    def make_reassembler(self, max_message_bytes: int) -> Reassembler:
        # v2 trades sit inside the "data" array, where sample_prefix does not look (only the top
        # object or a Binance combined stream's "data" object is read safely): sample nothing, so a
        # cut message is counted but never read.
        return Reassembler(max_message_bytes, frozenset(), frozenset(), event_field="channel",
                           record_id_fields={})

    def cut_record_id(self, sample: Optional[dict]) -> Optional[int]:
        """Always None: a cut v2 message cannot name its trades' ids safely (see make_reassembler);
        the reconnect's backfill from the cursor finds them."""
        return None

    def fetch_page(self, from_id: int, after_ts_ms=None):
        """(trades with id >= from_id ascending, whether the exchange had nothing newer).

        Pages go by time, so the start is the time of trade from_id - 1 (a millisecond early: the
        ids decide what is kept), or the previous page's `last`. A full page that lies wholly
        before from_id (many trades in that millisecond, or a searched start) is read past."""
        if self._resume is not None and self._resume[0] == from_id:
            since_ns = self._resume[1]
        elif after_ts_ms:
            since_ns = max(0, after_ts_ms - 1) * 1_000_000
        else:
            since_ns = self._search_since(from_id)
        for _ in range(MAX_PAGES_BEFORE_START):
            rejected = []
            page = self._get(since_ns, rejected)
            trades = [t for t in page.trades if t.id >= from_id]
            rejected = [row for row in rejected if row.id is None or row.id >= from_id]
            exhausted = page.rows < REST_PAGE_LIMIT
            if trades or rejected or exhausted or page.last_ns <= since_ns:
                break
            since_ns = page.last_ns - 1
            time.sleep(self.pacer.pause_s())
        if trades:
            # `last` less one: trades sharing its exact time come again and are dropped by id.
            self._resume = (trades[-1].id + 1, max(since_ns, page.last_ns - 1))
        return TradePage(trades, rejected), exhausted

    def _search_since(self, from_id: int) -> int:
        """A start time at or before trade from_id when its time is unknown (after a restart)."""
        lookback = SEARCH_FIRST_LOOKBACK_S
        while True:
            since_ns = max(0, time.time_ns() - lookback * 1_000_000_000)
            page = self._get(since_ns, [])          # a bad row does not spoil the search
            if not page.trades or page.trades[0].id <= from_id or lookback >= SEARCH_MAX_LOOKBACK_S:
                return since_ns
            lookback *= 4
            time.sleep(self.pacer.pause_s())

    def _get(self, since_ns: int, rejected: list = None) -> RestPage:
        query = urllib.parse.urlencode({"pair": self.pair, "since": since_ns, "count": REST_PAGE_LIMIT})
        body, _ = self.rest.get_json(f"/0/public/Trades?{query}", loads=loads_exact)
        return parse_rest_answer(body, int(time.time() * 1000), rejected)
