"""Exchange simulator: seeded trades, websocket streams, REST and fault injection on one port.

Run as `python -m tools.simulator --port 0 --port-file PATH [--mode binance|coinbase|kraken]`.
Binance mode (the default) serves the websocket upgrade (`/ws/btcusdt@trade`,
`/stream?streams=btcusdt@trade`, and `@aggTrade` likewise) and REST (`/api/v3/historicalTrades`,
`/api/v3/aggTrades`, ...); Coinbase mode the Exchange feed (`/`, `matches` and `heartbeat`
channels) and `/products/{id}/trades`; Kraken mode the v2 websocket (`/v2`, `trade` channel) and
`/0/public/Trades`. Every mode has the same seeded trade history, the same faults and a control
API under `/_sim/` for tests, the demo and benchmarks.

The modules, from the bottom up (each imports only those above it in this list):
  trades.py          the seeded trade generator, the bounded history, price/quantity/time texts
  http_wire.py       HTTP requests and JSON responses, query parameter checks
  websocket_wire.py  RFC 6455 framing, one tick's encoded trades, one connection's state
  exchange.py        what an exchange module is given (SimulatorState) and implements (ExchangeWire)
  binance.py, coinbase.py, kraken.py
                     each exchange's message formats, subscribe messages, REST endpoints and paging
  server.py          the trade clock, connections, routing, faults and the /_sim/ control API
  cli.py             the command line (__main__.py runs it)
  client.py          start_simulator / stop_simulator and SimulatorClient for the control API
"""

from tools.simulator.binance import REST_WEIGHTS, trade_payloads
from tools.simulator.cli import main
from tools.simulator.client import (PACKAGE_ROOT, SimulatorClient, SimulatorError, start_simulator,
                                    stop_simulator)
from tools.simulator.server import (DEFAULT_MAX_SEND_BUFFER, DEFAULT_RATE, DEFAULT_SEED, DEFAULT_START_ID,
                                    MAX_RATE, ExchangeSimulator, SimConfig)
from tools.simulator.websocket_wire import TickFeed, encode_message

__all__ = ["DEFAULT_MAX_SEND_BUFFER", "DEFAULT_RATE", "DEFAULT_SEED", "DEFAULT_START_ID", "MAX_RATE",
           "PACKAGE_ROOT", "REST_WEIGHTS", "ExchangeSimulator", "SimConfig", "SimulatorClient",
           "SimulatorError", "TickFeed", "encode_message", "main", "start_simulator", "stop_simulator",
           "trade_payloads"]
