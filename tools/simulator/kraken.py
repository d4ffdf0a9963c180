"""Kraken v2: the websocket on `/v2` (`trade` channel with JSON numbers, a status greeting, a
snapshot on subscribe, trades of one burst batched into one message) and GET /0/public/Trades,
paged by `since` in nanoseconds under Kraken's internal pair name."""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Optional

from tools.simulator.exchange import ExchangeWire, SimulatorState
from tools.simulator.http_wire import (REST_MAX_LIMIT, Handler, HttpRequest, HttpResponse, ParamError,
                                       int_param, json_response)
from tools.simulator.trades import iso_time, price_text, trade_rows
from tools.simulator.websocket_wire import OP_BINARY, OP_TEXT, WsConnection

DEFAULT_SYMBOL = "BTC/USD"
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9]{2,10}/[A-Z0-9]{2,10}$")
KRAKEN_TRADES_PER_MESSAGE = 50         # Kraken batches a burst of trades into one message's data
KRAKEN_SNAPSHOT_TRADES = 50


def short_decimal(text: str) -> str:
    """"43000.10000000" -> "43000.1": the shortest exact form (Kraken v2 sends JSON numbers)."""
    return text.rstrip("0").rstrip(".") if "." in text else text


def kraken_price_text(cents: int) -> str:
    return short_decimal(price_text(cents))


def kraken_rest_price_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}000"


def kraken_rest_pair(symbol: str) -> str:
    return "".join("XBT" if part == "BTC" else part for part in symbol.split("/"))


def kraken_result_key(symbol: str) -> str:
    """Kraken answers REST with its internal pair name: XXBTZUSD for BTC/USD."""
    base, quote = (("XBT" if part == "BTC" else part) for part in symbol.split("/"))
    return f"X{base}Z{quote}" if len(base) == 3 and len(quote) == 3 else base + quote


class RawJson:
    """A JSON number written exactly as given (Kraken REST times like 1688669597.827)."""

    def __init__(self, text: str):
        self.text = text


def dumps_with_raw(obj) -> str:
    if isinstance(obj, RawJson):
        return obj.text
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps_with_raw(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dumps_with_raw(v) for v in obj) + "]"
    return json.dumps(obj)


class KrakenProtocol(ExchangeWire):
    """Kraken v2 websocket (`trade` channel, JSON numbers) and GET /0/public/Trades."""

    trade_stream = "trade"
    sends_heartbeats = True
    garbage_frames = (
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":'),
        (OP_TEXT, b'{"hello":"world"}'),
        (OP_BINARY, b"\x00\x01\x02binary"),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"ETH/USD","side":"buy","price":1.5,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"%s","side":"buy","price":0.0,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"%s","side":"buy","price":NaN,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"%s","side":"buy","price":4.3e4,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
    )

    def __init__(self, sim: SimulatorState):
        super().__init__(sim)
        self.symbol = sim.symbol
        self.pair = kraken_rest_pair(sim.symbol)
        self.result_key = kraken_result_key(sim.symbol)
        self.qty_short = tuple(short_decimal(text) for text in sim.generator.qty_text)
        self.garbage_frames = tuple((op, payload.replace(b"%s", self.symbol.encode()))
                                    for op, payload in self.garbage_frames)
        self._connection_ids = itertools.count(1)

    # -- websocket
    def accepts_path(self, path: str) -> bool:
        return path in ("/v2", "/v2/", "", "/")

    def greeting(self, conn: WsConnection) -> list[bytes]:
        return [json.dumps({"channel": "status", "type": "update", "data": [
            {"api_version": "v2", "connection_id": next(self._connection_ids), "system": "online",
             "version": "2.0.0"}]}, separators=(",", ":")).encode()]

    def trade_item(self, trade_id: int, cents: int, qty: int, side: int, ms: int) -> str:
        taker = "sell" if side else "buy"           # isBuyerMaker: the taker sold
        return (f'{{"symbol":"{self.symbol}","side":"{taker}","price":{kraken_price_text(cents)},'
                f'"qty":{self.qty_short[qty]},"ord_type":"market","trade_id":{trade_id},'
                f'"timestamp":"{iso_time(ms)}"}}')

    def message(self, kind: str, items: list[str]) -> bytes:
        return f'{{"channel":"trade","type":"{kind}","data":[{",".join(items)}]}}'.encode()

    def tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        items = [self.trade_item(trade_id, cents, qty, side, time_ms)
                 for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]
        return [self.message("update", items[start:start + KRAKEN_TRADES_PER_MESSAGE])
                for start in range(0, len(items), KRAKEN_TRADES_PER_MESSAGE)]

    def heartbeat(self) -> bytes:
        return b'{"channel":"heartbeat"}'

    def answer(self, conn: WsConnection, message: bytes) -> list[bytes]:
        now = iso_time(time.time_ns() // 1_000_000)
        try:
            request = json.loads(message)
        except ValueError:
            return [self.error(None, "EGeneral:Invalid arguments", now)]
        if not isinstance(request, dict):
            return [self.error(None, "EGeneral:Invalid arguments", now)]
        method, params = request.get("method"), request.get("params") or {}
        if method == "ping":
            return [json.dumps({"method": "pong", "time_in": now, "time_out": now}).encode()]
        if method not in ("subscribe", "unsubscribe") or not isinstance(params, dict):
            return [self.error(method, "EGeneral:Invalid arguments", now)]
        if params.get("channel") != "trade":
            return [self.error(method, f"Channel {str(params.get('channel'))[:20]} not supported here", now)]
        symbols = params.get("symbol")
        if not isinstance(symbols, list) or symbols != [self.symbol]:
            return [self.error(method, f"Currency pair not supported {str(symbols)[:40]}", now)]
        if method == "unsubscribe":
            conn.streams = [s for s in conn.streams if s != self.trade_stream]
        elif self.trade_stream not in conn.streams:
            conn.streams.append(self.trade_stream)
        replies = [json.dumps({"method": method, "result": {"channel": "trade", "snapshot": bool(
            params.get("snapshot", True)), "symbol": self.symbol}, "success": True, "time_in": now,
            "time_out": now}, separators=(",", ":")).encode()]
        if method == "subscribe" and params.get("snapshot", True):
            history = self.sim.history
            newest = history.last_id
            rows = trade_rows(list(history.slices(newest - KRAKEN_SNAPSHOT_TRADES + 1, newest)))
            items = [self.trade_item(trade_id, cents, qty, side, ms)
                     for trade_id, cents, qty, ms, side in rows]
            replies.append(self.message("snapshot", items))
        return replies

    @staticmethod
    def error(method, text: str, now: str) -> bytes:
        return json.dumps({"error": text, "method": method, "success": False, "time_in": now,
                           "time_out": now}, separators=(",", ":")).encode()

    # -- REST
    def rest_handler(self, path: str) -> Optional[Handler]:
        return self.rest_trades if path == "/0/public/Trades" else None

    async def rest_trades(self, request: HttpRequest) -> HttpResponse:
        sim = self.sim
        if sim.rest429_remaining > 0:
            sim.rest429_remaining -= 1
            return json_response(200, {"error": ["EGeneral:Too many requests"]})
        if request.query.get("pair") not in (self.pair, self.symbol, self.result_key):
            return json_response(200, {"error": ["EQuery:Unknown asset pair"]})
        try:
            count = int_param(request.query, "count", REST_MAX_LIMIT, low=1, high=REST_MAX_LIMIT)
            since = int_param(request.query, "since", None, low=0)
        except ParamError:
            return json_response(200, {"error": ["EGeneral:Invalid arguments"]})
        history, visible = sim.history, sim.rest_last_id()
        if since is None:                          # the newest `count` trades
            oldest = max(history.first_id, visible - count + 1)
        else:                                      # trades after `since` (ns), oldest first
            oldest = history.first_id_after_time(since // 1_000_000)
        rows = [["NaN" if trade_id in sim.bad_rest_ids else kraken_rest_price_text(cents),
                 sim.generator.qty_text[qty], RawJson(f"{ms // 1000}.{ms % 1000:03d}"), "s" if side else "b",
                 "m", "", trade_id]
                for trade_id, cents, qty, ms, side in
                trade_rows(list(history.slices(oldest, min(visible, oldest + count - 1))))]
        last = rows[-1][2].text.replace(".", "") + "000000" if rows else str(since or 0)
        body = {"error": [], "result": {self.result_key: rows, "last": last}}
        return HttpResponse(200, dumps_with_raw(body).encode())

    # -- control API
    def history_price(self, cents: int) -> str:
        return kraken_price_text(cents)

    def history_qty_texts(self) -> tuple[str, ...]:
        return self.qty_short
