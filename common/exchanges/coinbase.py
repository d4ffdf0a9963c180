"""Coinbase Exchange: the `matches` websocket channel, heartbeats and REST product trades.

Trade ids are consecutive per product. `side` in Coinbase messages is the MAKER's side: a match with
side "sell" was a resting sell order taken by a buyer, so the taker (our `side`) bought. The
`heartbeat` channel says the product's newest trade id every second, so a gap shows even when the
market is quiet. REST pages are newest first; `after=X` gives the trades with ids below X.
"""

import time
import urllib.parse
from typing import Optional

import orjson

from btcfeed.exchanges.base import (Heartbeat, RequestPacer, RestError, TradePage, RestClient, iso_to_ms,
                             parse_rows, strictly_ascending)
from btcfeed.trade import MAX_EXACT_INT, BadMessage, MalformedJSON, Trade, check_decimal, check_int, check_qty
from btcfeed.wsframes import Reassembler

DEFAULT_WS_URL = "wss://ws-feed.exchange.coinbase.com"
DEFAULT_REST_URL = "https://api.exchange.coinbase.com"
REST_PAGE_LIMIT = 1000          # the most /products/{id}/trades returns per call
# Public REST endpoints allow about 10 requests/s (bursts of 15); stay at 80% of that.
REST_PER_SECOND = 8.0
REST_BURST = 5.0
# Heartbeats come every second on a subscribed connection: ten silent seconds mean it is dead.
STALE_AFTER_S = 10.0
TRADE_TYPES = ("match", "last_match")
# Valid feed messages that carry no trade for us (other channels, acknowledgements, order events).
NON_TRADE_TYPES = frozenset(("subscriptions", "ticker", "ticker_batch", "snapshot", "l2update", "level2",
                             "status", "received", "open", "done", "change", "activate"))
TAKER_SIDE = {"sell": "buy", "buy": "sell"}   # maker side -> taker side
# What a message cut by a lost connection can tell: its type, its product and the trade id (a match
# names its trade_id second, its product_id only after the order ids, side, size and price).
SAMPLE_STRING_FIELDS = frozenset(("type", "product_id"))
SAMPLE_ID_FIELDS = frozenset(("trade_id",))
SAMPLE_RECORD_ID_FIELDS = {kind: "trade_id" for kind in TRADE_TYPES}


def subscribe_message(product_id: str) -> bytes:
    return orjson.dumps({"type": "subscribe", "product_ids": [product_id],
                         "channels": ["matches", "heartbeat"]})


def taker_side(maker_side) -> str:
    side = TAKER_SIDE.get(maker_side) if maker_side.__class__ is str else None
    if side is None:
        raise BadMessage(f"side is not buy or sell: {maker_side!r:.20}")
    return side


def trade_from(message: dict, rts: int) -> Trade:
    """One trade from a match, last_match or REST trade object (the product already checked)."""
    return Trade(
        check_int("trade id", message.get("trade_id")),
        check_decimal("price", message.get("price")),
        check_qty(message.get("size")),
        taker_side(message.get("side")),
        iso_to_ms("trade time", message.get("time")),
        rts)


def parse_ws(raw, product_id: str, rts: int):
    """A Trade, a Heartbeat or None from one feed message; BadMessage for anything else."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:   # several documents in one message, or a cut one: split them
        raise MalformedJSON(f"malformed JSON: {exc}")
    if not isinstance(message, dict):
        raise BadMessage("message is not a JSON object")
    kind = message.get("type")
    if kind in TRADE_TYPES:
        check_product(message, product_id)
        return trade_from(message, rts)
    if kind == "heartbeat":
        check_product(message, product_id)
        return Heartbeat(check_int("heartbeat last_trade_id", message.get("last_trade_id")))
    if kind == "error":
        text, reason = str(message.get("message"))[:80], str(message.get("reason"))[:80]
        raise BadMessage(f"exchange error: {text} {reason}")
    if isinstance(kind, str) and kind in NON_TRADE_TYPES:
        return None
    raise BadMessage("unknown message shape")


def check_product(message: dict, product_id: str) -> None:
    if message.get("product_id") != product_id:
        raise BadMessage(f"message for product {message.get('product_id')!r:.20}, expected {product_id}")


def parse_rest_page(body, rts: int, rejected: list = None) -> list:
    """Trades of one /products/{id}/trades answer (newest first) in ascending id order. A bad row
    refuses the whole page, or with a rejected list goes there (common.exchange.RejectedRow)."""
    if not isinstance(body, list):
        raise BadMessage("product trades answer is not a list")
    trades = parse_rows(reversed(body), lambda item: rest_trade(item, rts), lambda item: item.get("trade_id"),
                        rejected)
    if not strictly_ascending(trades):
        raise BadMessage("REST trade ids are not strictly descending")
    return trades


def rest_trade(item, rts: int) -> Trade:
    if not isinstance(item, dict):
        raise BadMessage("REST trade is not a JSON object")
    return trade_from(item, rts)


class CoinbaseAdapter:
    exchange = "coinbase"
    id_space = "trade"             # one kind of record, one id sequence per product
    page_limit = REST_PAGE_LIMIT
    pages_by_time = False
    stale_after_s = STALE_AFTER_S

    def __init__(self, product_id: str, ws_url: str = DEFAULT_WS_URL, rest_url: str = DEFAULT_REST_URL):
        self.symbol = product_id
        self.ws_url = ws_url.rstrip("/")
        self.rest_url = rest_url.rstrip("/")
        self.rest = RestClient(self.rest_url)
        self.pacer = RequestPacer(REST_PER_SECOND, REST_BURST)

    def subscribe_messages(self) -> list:
        return [subscribe_message(self.symbol)]

    def parse(self, raw, rts: int):
        return parse_ws(raw, self.symbol, rts)

    def fetch_page(self, from_id: int, after_ts_ms=None):
        """(trades from_id .. from_id + 999, whether that reached the newest trade): `after` is exclusive
        and pages go newest first, so asking for the page older than from_id + 1000 gives exactly that
        window (or the newest trades)."""
        query = urllib.parse.urlencode({"after": from_id + REST_PAGE_LIMIT, "limit": REST_PAGE_LIMIT})
        path = f"/products/{urllib.parse.quote(self.symbol, safe='')}/trades?{query}"
        body, _ = self.rest.get_json(path)
        rejected = []
        page = parse_rest_page(body, _now_ms(), rejected)
        trades = [trade for trade in page if trade.id >= from_id]
        rejected = [row for row in rejected if row.id is None or row.id >= from_id]
        return TradePage(trades, rejected), len(trades) + len(rejected) < REST_PAGE_LIMIT

    def rest_pause_s(self) -> float:
        return self.pacer.pause_s()

    def close(self) -> None:
        self.rest.close()

    def make_reassembler(self, max_message_bytes: int) -> Reassembler:
        return Reassembler(max_message_bytes, SAMPLE_STRING_FIELDS, SAMPLE_ID_FIELDS, event_field="type",
                           record_id_fields=SAMPLE_RECORD_ID_FIELDS)

    def cut_record_id(self, sample: Optional[dict]) -> Optional[int]:
        return cut_record_id(sample, self.symbol)


def cut_record_id(sample: Optional[dict], product_id: str) -> Optional[int]:
    """The trade id of the match a lost connection cut, from a sample_prefix() result; None unless
    the sample names a match (or last_match) of this product: a cut heartbeat, ticker or another
    product's match never steers a backfill."""
    if not sample or sample.get("type") not in TRADE_TYPES or sample.get("product_id") != product_id:
        return None
    trade_id = sample.get("trade_id")
    if type(trade_id) is not int or not 0 <= trade_id < MAX_EXACT_INT:
        return None
    return trade_id


def _now_ms() -> int:
    return int(time.time() * 1000)


__all__ = ["CoinbaseAdapter", "parse_ws", "parse_rest_page", "subscribe_message", "cut_record_id",
           "RestError"]
