"""What an exchange module is given by the server and what it gives back.

Every exchange shares one trade clock, history and set of faults; an exchange module only decides
how trades look on its wire, which websocket paths and subscribe messages it takes, and its REST
paging. The server holds the state below and hands itself to the exchange's ExchangeWire."""

from __future__ import annotations

import collections
from typing import Optional, Protocol

from tools.simulator.http_wire import Handler, HttpRequest
from tools.simulator.trades import TradeGenerator, TradeHistory, price_text
from tools.simulator.websocket_wire import WsConnection


class SimulatorState(Protocol):
    """The part of the server an exchange reads (and, for the rest429 fault, counts down)."""

    symbol: str
    generator: TradeGenerator
    history: TradeHistory
    rest429_remaining: int             # REST requests still to refuse as rate limited
    bad_rest_ids: set[int]             # ids whose REST rows carry a NaN price ("badrow")
    rest_calls: collections.Counter    # REST requests by path, for the traffic control endpoint

    def rest_last_id(self) -> int:
        """The newest trade REST may show (older than the live feed under a "restlag" fault)."""


class ExchangeWire:
    """One exchange's websocket and REST shapes; the defaults are what an exchange lacking a feature does."""

    trade_stream: str
    agg_stream: Optional[str] = None           # a second trade stream (Binance's aggregate trades)
    sends_heartbeats = False                   # a beat every second on subscribed connections
    garbage_frames: tuple[tuple[int, bytes], ...] = ()

    def __init__(self, sim: SimulatorState):
        self.sim = sim

    # -- websocket
    def accepts_path(self, path: str) -> bool:
        return False

    def stream_subscription(self, request: HttpRequest) -> Optional[tuple[list[str], bool]]:
        """(stream names, combined?) a new connection starts with; None refuses the path. By default
        connections start without streams: the client subscribes by message."""
        return ([], False) if self.accepts_path(request.path) else None

    def greeting(self, conn: WsConnection) -> list[bytes]:
        return []

    def tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        raise NotImplementedError

    def answer(self, conn: WsConnection, message: bytes) -> list[bytes]:
        """The replies to one client message (subscribe, unsubscribe, ...)."""
        raise NotImplementedError

    # -- REST
    def rest_handler(self, path: str) -> Optional[Handler]:
        return None

    # -- control API: history rows printed as this exchange's trades carry them
    def history_price(self, cents: int) -> str:
        return price_text(cents)

    def history_qty_texts(self) -> tuple[str, ...]:
        return self.sim.generator.qty_text
