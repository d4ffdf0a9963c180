"""Binance spot endpoints: the stream URL, the REST client for trades or aggregate trades, and the
adapter that gives ingest both (see common/exchanges/base.py for the adapter shape).

A source follows one record kind: every trade ("trade": stream `<symbol>@trade`, REST
historicalTrades, ids "t") or aggregate trades ("aggTrade": stream `<symbol>@aggTrade`, REST
aggTrades, aggregate ids "a"). Both kinds number their records consecutively, so gap detection and
backfill work the same way whichever is followed.
"""

import json
import time
import urllib.parse
from typing import NamedTuple, Optional

from btcfeed.exchanges.base import (MAX_REST_BYTES, REST_DEADLINE_S, RateLimited, RestClient, RestError,
                                    TradePage, parse_rows)
from btcfeed.trade import (BINANCE_KINDS, BINANCE_REST_ID_FIELD, BadMessage, binance_cut_record_id,
                          parse_binance_rest, parse_binance_ws)
from btcfeed.wsframes import Reassembler

REST_PAGE_LIMIT = 1000          # the most historicalTrades and aggTrades return per call
REST_TIMEOUT_S = 10.0
DEFAULT_RETRY_AFTER_S = 5.0
# Binance allows 6,000 request weight per minute per IP; keeping below 80% leaves room for other
# clients on the same address and never provokes a 418 ban.
WEIGHT_LIMIT_PER_MINUTE = 6000
WEIGHT_SAFE_FRACTION = 0.8


class RestEndpoint(NamedTuple):
    path: str
    weight: int                 # request weight per call (Binance spot market-data docs)


# historicalTrades reads the trade database (weight 25); aggTrades is far cheaper (weight 4), so an
# aggTrade source can backfill about six times as many pages per minute under the same budget.
REST_ENDPOINTS = {
    "trade": RestEndpoint("/api/v3/historicalTrades", 25),
    "aggTrade": RestEndpoint("/api/v3/aggTrades", 4),
}


# Binance pings every 20 s and drops a client that stays silent for a minute; a connection on
# which nothing at all (not even a ping) arrived for this long is dead even if TCP says otherwise.
STALE_AFTER_S = 65.0
__all__ = ["RateLimited", "RestError", "BinanceRest", "BinanceAdapter", "stream_url", "stream_name",
           "REST_PAGE_LIMIT", "REST_ENDPOINTS"]


def check_kind(kind: str) -> str:
    if kind not in BINANCE_KINDS:
        raise ValueError(f"unknown Binance record kind {kind!r} (supported: {', '.join(BINANCE_KINDS)})")
    return kind


def stream_name(symbol: str, kind: str = "trade") -> str:
    return f"{symbol.lower()}@{check_kind(kind)}"


def stream_url(base_url: str, symbol: str, form: str, kind: str = "trade") -> str:
    base = base_url.rstrip("/")
    if form == "raw":
        return f"{base}/ws/{stream_name(symbol, kind)}"
    return f"{base}/stream?streams={stream_name(symbol, kind)}"


class BinanceRest:
    """GET /api/v3/historicalTrades or /api/v3/aggTrades with rate-limit handling; validated trades."""

    def __init__(self, base_url: str, symbol: str, timeout_s: float = REST_TIMEOUT_S, kind: str = "trade"):
        self.base_url = base_url.rstrip("/")
        self.symbol = symbol
        self.timeout_s = timeout_s
        self.kind = check_kind(kind)
        self.endpoint = REST_ENDPOINTS[kind]
        self.used_weight = 0
        # A ban (418) is rate limiting too; without Retry-After, wait longer than for other exchanges.
        self.client = RestClient(self.base_url, timeout_s, rate_limited_codes=(418, 429),
                                 default_retry_after_s=DEFAULT_RETRY_AFTER_S)

    def historical_trades(self, from_id: int, limit: int = REST_PAGE_LIMIT, rejected: list = None):
        """Records with id >= from_id (at most limit), validated; raises RestError or BadMessage.
        The ids are trade ids or aggregate ids, by the kind this client was made for. With a
        rejected list, an invalid row goes there (common.exchange.RejectedRow) instead of refusing
        the whole page."""
        query = urllib.parse.urlencode({"symbol": self.symbol, "fromId": from_id, "limit": limit})
        body = self._get(f"{self.endpoint.path}?{query}")
        if not isinstance(body, list):
            raise BadMessage(f"{self.endpoint.path.rpartition('/')[2]} answer is not a list")
        rts = int(time.time() * 1000)
        id_field = BINANCE_REST_ID_FIELD[self.kind]
        trades = parse_rows(body, lambda item: parse_binance_rest(item, rts, self.kind),
                            lambda item: item.get(id_field), rejected)
        if not all(a.id < b.id for a, b in zip(trades, trades[1:])):
            raise BadMessage(f"{self.endpoint.path.rpartition('/')[2]} ids are not strictly ascending")
        return trades

    def weight_pause_s(self) -> float:
        """How long to wait before the next call to stay under the safe share of the weight limit
        (the next call's own weight counted)."""
        if self.used_weight + self.endpoint.weight <= WEIGHT_LIMIT_PER_MINUTE * WEIGHT_SAFE_FRACTION:
            return 0.0
        return 60.0 - (time.time() % 60.0) + 0.5

    def _get(self, path: str):
        # REST_DEADLINE_S is read here, at each call, so it can be changed for the whole module.
        raw, _ = self.client.get(path, deadline_s=REST_DEADLINE_S, max_bytes=MAX_REST_BYTES,
                                 on_headers=self._note_weight)
        try:
            return json.loads(raw)
        except ValueError:
            raise BadMessage(f"REST answer is not JSON: {raw[:80]!r}")

    def close(self) -> None:
        self.client.close()

    def _note_weight(self, headers) -> None:
        if headers is None:
            return
        value = headers.get("X-MBX-USED-WEIGHT-1M") or headers.get("x-mbx-used-weight-1m")
        if value and value.isdigit():
            self.used_weight = int(value)


class BinanceAdapter:
    """Binance spot: the stream is chosen by the URL; `trade` and `aggTrade` records carry
    consecutive ids ("t" and "a")."""

    exchange = "binance"
    page_limit = REST_PAGE_LIMIT
    pages_by_time = False
    stale_after_s = STALE_AFTER_S

    def __init__(self, symbol: str, ws_base_url: str, rest_base_url: str, stream_form: str = "combined",
                 kind: str = "trade"):
        self.symbol = symbol
        self.kind = check_kind(kind)
        # trade ids and aggregate ids are separate sequences: the cursor is only valid for its kind.
        self.id_space = self.kind
        self.ws_url = stream_url(ws_base_url, symbol, stream_form, kind)
        self.rest = BinanceRest(rest_base_url, symbol, kind=kind)

    def subscribe_messages(self) -> list:
        return []

    def parse(self, raw, rts: int):
        return parse_binance_ws(raw, self.symbol, rts, self.kind)

    def fetch_page(self, from_id: int, after_ts_ms=None):
        """(records with id >= from_id, whether the exchange had nothing newer); rows refused one by
        one are in the page's `rejected`."""
        rejected = []
        page = self.rest.historical_trades(from_id, rejected=rejected)
        return (TradePage([t for t in page if t.id >= from_id], rejected),
                len(page) + len(rejected) < REST_PAGE_LIMIT)

    def rest_pause_s(self) -> float:
        return self.rest.weight_pause_s()

    def close(self) -> None:
        self.rest.close()

    def make_reassembler(self, max_message_bytes: int) -> Reassembler:
        # The default sampling is Binance's: "e", "s", "stream", and the ids "t", "a", "f", "l".
        return Reassembler(max_message_bytes)

    def cut_record_id(self, sample: Optional[dict]) -> Optional[int]:
        return binance_cut_record_id(sample, self.symbol, self.kind)
