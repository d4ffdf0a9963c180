"""Binance spot: `trade` and `aggTrade` events on `/ws/...` and `/stream?streams=...`, the live
SUBSCRIBE methods, and REST (`/api/v3/historicalTrades`, `/api/v3/aggTrades`, `/api/v3/trades`,
ping, time) with request weights. Each simulated trade is its own aggregate trade (aggregate id =
trade id, first = last = that trade), so one history answers for both kinds."""

from __future__ import annotations

import array
import itertools
import json
import re
import time
from typing import Optional

from tools.simulator.exchange import ExchangeWire, SimulatorState
from tools.simulator.http_wire import (REST_MAX_LIMIT, Handler, HttpRequest, HttpResponse, ParamError,
                                       json_response)
from tools.simulator.trades import BOOL_TEXT, price_text, quote_qty_text, trade_rows
from tools.simulator.websocket_wire import OP_BINARY, OP_TEXT, WsConnection

DEFAULT_SYMBOL = "BTCUSDT"
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9\-_.]{1,20}$")

# REST (Binance spot request weights and limits).
REST_DEFAULT_LIMIT = 500
# The market-data endpoints (the ones rest429 faults refuse); everything else weighs 1.
REST_WEIGHTS = {"/api/v3/historicalTrades": 25, "/api/v3/trades": 25, "/api/v3/aggTrades": 4}
TOO_MANY_REQUESTS_MSG = ("Too many requests; current limit of IP(127.0.0.1) is 6000 request weight per "
                         "1 MINUTE. Please use the websocket for live updates to avoid polling the API.")

# What the "garbage" fault sends on every connection: none of it may ever become a trade.
GARBAGE_FRAMES = (
    (OP_TEXT, b'{"e":"trade","s":"BTCUSDT","t":'),                                    # malformed JSON
    (OP_TEXT, b'{"hello":"world"}'),                                                  # unknown shape
    (OP_BINARY, b"\x00\x01\x02binary"),                                                # binary frame
    (OP_TEXT, b'{"e":"trade","E":1,"s":"ETHUSDT","t":5,"p":"1.0","q":"1.0","T":1,"m":true,"M":true}'),
    (OP_TEXT, b'{"e":"trade","E":1,"s":"BTCUSDT","t":5,"p":"0.00000000","q":"1.0","T":1,"m":true,"M":true}'),
    (OP_TEXT, b'{"e":"trade","E":1,"s":"BTCUSDT","t":5,"p":"NaN","q":"1.0","T":1,"m":true,"M":true}'),
)


# ---------------------------------------------------------------------------------------------
# Message formats
# ---------------------------------------------------------------------------------------------

def trade_payloads(symbol: str, first_id: int, prices: array.array, qty_index: array.array,
                   sides: bytearray, time_ms: int, qty_text: tuple[str, ...]) -> list[bytes]:
    """Binance `trade` events; event time and trade time are both the generation time."""
    head = f'{{"e":"trade","E":{time_ms},"s":"{symbol}","t":'
    time_and_side = f',"T":{time_ms},"m":'
    return [f'{head}{trade_id},"p":"{price_text(cents)}","q":"{qty_text[qty]}"{time_and_side}'
            f'{BOOL_TEXT[side]},"M":true}}'.encode()
            for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]


def agg_trade_payloads(symbol: str, first_id: int, prices: array.array, qty_index: array.array,
                       sides: bytearray, time_ms: int, qty_text: tuple[str, ...]) -> list[bytes]:
    """Binance `aggTrade` events, one per trade: aggregate id, first and last trade id all equal it."""
    head = f'{{"e":"aggTrade","E":{time_ms},"s":"{symbol}","a":'
    return [f'{head}{trade_id},"p":"{price_text(cents)}","q":"{qty_text[qty]}","f":{trade_id},"l":{trade_id},'
            f'"T":{time_ms},"m":{BOOL_TEXT[side]},"M":true}}'.encode()
            for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]


def shutdown_notice() -> dict:
    """Binance's maintenance notice, sent a little before it closes a connection."""
    return {"e": "serverShutdown", "E": int(time.time() * 1000)}


def binance_error(status: int, code: int, msg: str, headers: Optional[dict[str, str]] = None) -> HttpResponse:
    return json_response(status, {"code": code, "msg": msg}, headers)


# ---------------------------------------------------------------------------------------------
# Websocket
# ---------------------------------------------------------------------------------------------

class BinanceProtocol(ExchangeWire):
    """Streams named in the path (`/ws/a/b` raw, `/stream?streams=a/b` combined) or subscribed by
    SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS messages."""

    garbage_frames = GARBAGE_FRAMES

    def __init__(self, sim: SimulatorState):
        super().__init__(sim)
        self.trade_stream = f"{sim.symbol.lower()}@trade"
        self.agg_stream = f"{sim.symbol.lower()}@aggTrade"

    def stream_subscription(self, request: HttpRequest) -> Optional[tuple[list[str], bool]]:
        if request.path == "/ws" or request.path.startswith("/ws/"):
            return [name for name in request.path[4:].split("/") if name], False
        if request.path == "/stream":
            return [name for name in request.query.get("streams", "").split("/") if name], True
        return None

    def tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        return trade_payloads(self.sim.symbol, first_id, prices, qty_index, sides, time_ms,
                              self.sim.generator.qty_text)

    def agg_tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        return agg_trade_payloads(self.sim.symbol, first_id, prices, qty_index, sides, time_ms,
                                  self.sim.generator.qty_text)

    def answer(self, conn: WsConnection, message: bytes) -> list[bytes]:
        try:
            request = json.loads(message)
        except ValueError:
            reply = {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}
        else:
            reply = self.apply_subscription_request(conn, request)
        return [json.dumps(reply, separators=(",", ":")).encode()]

    @staticmethod
    def apply_subscription_request(conn: WsConnection, request) -> dict:
        if not isinstance(request, dict):
            return {"code": 2, "msg": "Invalid request: expected an object"}
        request_id, method, params = request.get("id"), request.get("method"), request.get("params", [])
        if not isinstance(params, list) or not all(isinstance(name, str) for name in params):
            return {"code": 2, "msg": "Invalid request: params must be a list of stream names",
                    "id": request_id}
        if method == "SUBSCRIBE":
            conn.streams.extend(name for name in params if name not in conn.streams)
            return {"result": None, "id": request_id}
        if method == "UNSUBSCRIBE":
            conn.streams = [name for name in conn.streams if name not in params]
            return {"result": None, "id": request_id}
        if method == "LIST_SUBSCRIPTIONS":
            return {"result": list(conn.streams), "id": request_id}
        return {"code": 2, "msg": f"Invalid request: unknown variant {str(method)[:40]}, expected one of "
                                  "SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS", "id": request_id}


# ---------------------------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------------------------

class BinanceRest:
    """The /api/v3 endpoints, with Binance's request weights, refusals and paging."""

    def __init__(self, sim: SimulatorState):
        self.sim = sim
        self._weight_minute = -1
        self._weight_used = 0

    def routes(self) -> dict[str, tuple[str, Handler]]:
        return {
            "/api/v3/ping": ("GET", self.rest_ping),
            "/api/v3/time": ("GET", self.rest_time),
            "/api/v3/historicalTrades": ("GET", self.rest_historical_trades),
            "/api/v3/aggTrades": ("GET", self.rest_agg_trades),
            "/api/v3/trades": ("GET", self.rest_recent_trades),
        }

    def charge_weight(self, path: str) -> dict[str, str]:
        minute = int(time.time() // 60)
        if minute != self._weight_minute:
            self._weight_minute, self._weight_used = minute, 0
        self._weight_used += REST_WEIGHTS.get(path, 1)
        self.sim.rest_calls[path] += 1
        return {"X-MBX-USED-WEIGHT-1M": str(self._weight_used)}

    def market_data_gate(self, request: HttpRequest) -> tuple[dict[str, str], Optional[HttpResponse]]:
        """Weight headers, and the response to give instead when the request must fail up front."""
        headers = self.charge_weight(request.path)
        if self.sim.rest429_remaining > 0:
            self.sim.rest429_remaining -= 1
            return headers, binance_error(429, -1003, TOO_MANY_REQUESTS_MSG, {**headers, "Retry-After": "1"})
        symbol = request.query.get("symbol", "")
        if not symbol:
            return headers, binance_error(
                400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
                headers)
        if not SYMBOL_PATTERN.match(symbol):
            return headers, binance_error(
                400, -1100, "Illegal characters found in parameter 'symbol'; legal range is "
                            "'^[A-Z0-9-_.]{1,20}$'.", headers)
        if symbol != self.sim.symbol:
            return headers, binance_error(400, -1121, "Invalid symbol.", headers)
        return headers, None

    async def rest_ping(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, {}, self.charge_weight(request.path))

    async def rest_time(self, request: HttpRequest) -> HttpResponse:
        server_time = time.time_ns() // 1_000_000
        return json_response(200, {"serverTime": server_time}, self.charge_weight(request.path))

    def paged_query(self, request: HttpRequest):
        """The checks and parameters historicalTrades and aggTrades share: (headers, limit, fromId
        or None, None) or (headers, None, None, the refusal to answer with)."""
        headers, refusal = self.market_data_gate(request)
        if refusal:
            return headers, None, None, refusal
        try:
            return headers, self.rest_limit(request.query), self.rest_from_id(request.query), None
        except ParamError as exc:
            return headers, None, None, binance_error(400, -1100, str(exc), headers)

    async def rest_historical_trades(self, request: HttpRequest) -> HttpResponse:
        headers, limit, from_id, refusal = self.paged_query(request)
        if refusal:
            return refusal
        if from_id is None:
            return self.recent_trades_response(limit, headers)
        return self.trades_response(max(from_id, self.sim.history.first_id), limit, headers)

    async def rest_agg_trades(self, request: HttpRequest) -> HttpResponse:
        """GET /api/v3/aggTrades: by fromId (inclusive), else the most recent; one aggregate per trade."""
        headers, limit, from_id, refusal = self.paged_query(request)
        if refusal:
            return refusal
        if from_id is None:
            from_id = self.sim.rest_last_id() + 1 - limit
        return self.agg_trades_response(max(from_id, self.sim.history.first_id), limit, headers)

    async def rest_recent_trades(self, request: HttpRequest) -> HttpResponse:
        headers, refusal = self.market_data_gate(request)
        if refusal:
            return refusal
        try:
            limit = self.rest_limit(request.query)
        except ParamError as exc:
            return binance_error(400, -1100, str(exc), headers)
        return self.recent_trades_response(limit, headers)

    @staticmethod
    def rest_limit(query: dict[str, str]) -> int:
        raw = query.get("limit", "")
        if raw == "":
            return REST_DEFAULT_LIMIT
        if not raw.isdigit() or not 1 <= int(raw) <= REST_MAX_LIMIT:
            raise ParamError("Illegal characters found in parameter 'limit'; "
                             f"legal range is '1-{REST_MAX_LIMIT}'.")
        return int(raw)

    @staticmethod
    def rest_from_id(query: dict[str, str]) -> Optional[int]:
        raw = query.get("fromId", "")
        if raw == "":
            return None
        if not raw.isdigit() or len(raw) > 20:
            raise ParamError("Illegal characters found in parameter 'fromId'; "
                             "legal range is '^[0-9]{1,20}$'.")
        return int(raw)

    def recent_trades_response(self, limit: int, headers: dict[str, str]) -> HttpResponse:
        oldest = max(self.sim.history.first_id, self.sim.rest_last_id() + 1 - limit)
        return self.trades_response(oldest, limit, headers)

    def trades_response(self, from_id: int, limit: int, headers: dict[str, str]) -> HttpResponse:
        sim = self.sim
        qty_units = sim.generator.qty_units
        qty_text = sim.generator.qty_text
        trades = [
            {"id": trade_id, "price": price_text(cents), "qty": qty_text[qty],
             "quoteQty": quote_qty_text(cents, qty_units[qty]), "time": ms,
             "isBuyerMaker": bool(side), "isBestMatch": True}
            for trade_id, cents, qty, ms, side in
            trade_rows(list(sim.history.slices(from_id, min(from_id + limit - 1, sim.rest_last_id()))))]
        for trade in trades:
            if trade["id"] in sim.bad_rest_ids:
                trade["price"] = "NaN"
        return json_response(200, trades, headers)

    def agg_trades_response(self, from_id: int, limit: int, headers: dict[str, str]) -> HttpResponse:
        sim = self.sim
        qty_text = sim.generator.qty_text
        rows = [{"a": trade_id, "p": "NaN" if trade_id in sim.bad_rest_ids else price_text(cents),
                 "q": qty_text[qty], "f": trade_id, "l": trade_id, "T": ms, "m": bool(side), "M": True}
                for trade_id, cents, qty, ms, side in
                trade_rows(list(sim.history.slices(from_id, min(from_id + limit - 1, sim.rest_last_id()))))]
        return json_response(200, rows, headers)
