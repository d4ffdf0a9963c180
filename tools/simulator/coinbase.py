"""Coinbase Exchange: the websocket feed on `/` (`matches` and `heartbeat` channels, subscribed by
message) and GET /products/{id}/trades, paged newest first with the CB-BEFORE / CB-AFTER cursors."""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.parse
from typing import Optional

from tools.simulator.exchange import ExchangeWire, SimulatorState
from tools.simulator.http_wire import (REST_MAX_LIMIT, Handler, HttpRequest, HttpResponse, ParamError,
                                       int_param, json_response)
from tools.simulator.trades import iso_time, trade_rows
from tools.simulator.websocket_wire import OP_BINARY, OP_TEXT, WsConnection

DEFAULT_SYMBOL = "BTC-USD"
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9]{2,10}-[A-Z0-9]{2,10}$")
COINBASE_SEQUENCE_OFFSET = 10_000_000_000


def coinbase_price_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


class CoinbaseProtocol(ExchangeWire):
    """Coinbase Exchange feed (`matches`, `heartbeat` channels) and GET /products/{id}/trades."""

    trade_stream = "matches"
    sends_heartbeats = True
    garbage_frames = (
        (OP_TEXT, b'{"type":"match","trade_id":'),
        (OP_TEXT, b'{"hello":"world"}'),
        (OP_BINARY, b"\x00\x01\x02binary"),
        (OP_TEXT, b'{"type":"match","trade_id":5,"side":"sell","size":"1.0","price":"1.0",'
                  b'"product_id":"ETH-USD",'
                  b'"sequence":1,"time":"2026-01-01T00:00:00.000000Z"}'),
        (OP_TEXT, b'{"type":"match","trade_id":5,"side":"sell","size":"1.0","price":"0.00","product_id":"%s",'
                  b'"sequence":1,"time":"2026-01-01T00:00:00.000000Z"}'),
        (OP_TEXT, b'{"type":"match","trade_id":5,"side":"sell","size":"1.0","price":"NaN","product_id":"%s",'
                  b'"sequence":1,"time":"2026-01-01T00:00:00.000000Z"}'),
    )

    def __init__(self, sim: SimulatorState):
        super().__init__(sim)
        self.product = sim.symbol
        self.rest_path = re.compile(r"^/products/([^/]+)/trades$")
        self.garbage_frames = tuple((op, payload.replace(b"%s", self.product.encode()))
                                    for op, payload in self.garbage_frames)

    # -- websocket
    def accepts_path(self, path: str) -> bool:
        return path in ("", "/")

    def match(self, kind: str, trade_id: int, cents: int, qty: int, side: int, ms: int) -> bytes:
        qty_text = self.sim.generator.qty_text[qty]
        maker = "buy" if side else "sell"        # isBuyerMaker: the resting order was the buy
        return (f'{{"type":"{kind}","trade_id":{trade_id},"maker_order_id":"{trade_id:032x}",'
                f'"taker_order_id":"{trade_id + 1:032x}","side":"{maker}","size":"{qty_text}",'
                f'"price":"{coinbase_price_text(cents)}","product_id":"{self.product}",'
                f'"sequence":{trade_id + COINBASE_SEQUENCE_OFFSET},"time":"{iso_time(ms)}"}}').encode()

    def tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        return [self.match("match", trade_id, cents, qty, side, time_ms)
                for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]

    def heartbeat(self, last_id: Optional[int] = None) -> bytes:
        last_id = self.sim.history.last_id if last_id is None else last_id
        return (f'{{"type":"heartbeat","sequence":{last_id + COINBASE_SEQUENCE_OFFSET},'
                f'"last_trade_id":{last_id},'
                f'"product_id":"{self.product}","time":"{iso_time(time.time_ns() // 1_000_000)}"}}').encode()

    def answer(self, conn: WsConnection, message: bytes) -> list[bytes]:
        try:
            request = json.loads(message)
        except ValueError:
            return [self.error("Failed to parse request", "malformed JSON")]
        if not isinstance(request, dict) or request.get("type") not in ("subscribe", "unsubscribe"):
            return [self.error("Failed to subscribe", "type must be subscribe or unsubscribe")]
        products = request.get("product_ids", [])
        channels = [c if isinstance(c, str) else c.get("name") if isinstance(c, dict) else None
                    for c in request.get("channels", [])]
        if not isinstance(products, list) or any(p != self.product for p in products):
            return [self.error("Failed to subscribe", f"{str(products)[:40]} is not a valid product")]
        if request["type"] == "unsubscribe":
            conn.streams = [s for s in conn.streams if s not in channels]
            return [self.subscriptions(conn)]
        new_matches = "matches" in channels and "matches" not in conn.streams
        conn.streams.extend(c for c in channels if c in ("matches", "heartbeat") and c not in conn.streams)
        replies = [self.subscriptions(conn)]
        history = self.sim.history
        if new_matches and history.last_id >= history.first_id:
            # Coinbase starts a matches subscription with the product's newest trade.
            (row,) = trade_rows(list(history.slices(history.last_id, history.last_id)))
            trade_id, cents, qty, ms, side = row
            replies.append(self.match("last_match", trade_id, cents, qty, side, ms))
        return replies

    def subscriptions(self, conn: WsConnection) -> bytes:
        return json.dumps({"type": "subscriptions", "channels": [
            {"name": name, "product_ids": [self.product]} for name in conn.streams]},
            separators=(",", ":")).encode()

    @staticmethod
    def error(message: str, reason: str) -> bytes:
        return json.dumps({"type": "error", "message": message, "reason": reason},
                          separators=(",", ":")).encode()

    # -- REST
    def rest_handler(self, path: str) -> Optional[Handler]:
        return self.rest_trades if self.rest_path.match(path) else None

    async def rest_trades(self, request: HttpRequest) -> HttpResponse:
        sim = self.sim
        if sim.rest429_remaining > 0:
            sim.rest429_remaining -= 1
            return json_response(429, {"message": "Public rate limit exceeded"})
        product = urllib.parse.unquote(self.rest_path.match(request.path).group(1))
        if product != self.product:
            return json_response(404, {"message": "NotFound"})
        try:
            limit = int_param(request.query, "limit", REST_MAX_LIMIT, low=1, high=REST_MAX_LIMIT)
            before = int_param(request.query, "before", None, low=0)
            after = int_param(request.query, "after", None, low=0)
        except ParamError as exc:
            return json_response(400, {"message": str(exc)})
        history, visible = sim.history, sim.rest_last_id()
        if after is not None:                     # older than `after`: the page ending just below it
            newest = min(after - 1, visible)
            oldest = max(newest - limit + 1, history.first_id)
        elif before is not None:                  # newer than `before`: the page starting just above it
            oldest = max(before + 1, history.first_id)
            newest = min(oldest + limit - 1, visible)
        else:
            newest = visible
            oldest = max(newest - limit + 1, history.first_id)
        qty_text = sim.generator.qty_text
        rows = [{"time": iso_time(ms), "trade_id": trade_id,
                 "price": "NaN" if trade_id in sim.bad_rest_ids else coinbase_price_text(cents),
                 "size": qty_text[qty], "side": "buy" if side else "sell"}
                for trade_id, cents, qty, ms, side in trade_rows(list(history.slices(oldest, newest)))]
        rows.reverse()                            # newest first
        headers = ({"CB-BEFORE": str(rows[0]["trade_id"]), "CB-AFTER": str(rows[-1]["trade_id"])}
                   if rows else {})
        return json_response(200, rows, headers)

    # -- control API
    def history_price(self, cents: int) -> str:
        return coinbase_price_text(cents)
