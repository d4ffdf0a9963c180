"""Exchange simulator: seeded trades, websocket streams, REST and fault injection on one port.

Run as `python -m tools.simulator --port 0 --port-file PATH [--mode binance|coinbase|kraken]`.
"""

from tools.simulator.server import (DEFAULT_MAX_SEND_BUFFER, DEFAULT_RATE, DEFAULT_SEED, DEFAULT_START_ID,
                                    MAX_RATE, PACKAGE_ROOT, REST_WEIGHTS, ExchangeSimulator, SimConfig,
                                    SimulatorClient, SimulatorError, TickFeed, encode_message, main,
                                    start_simulator, stop_simulator, trade_payloads)

__all__ = ["DEFAULT_MAX_SEND_BUFFER", "DEFAULT_RATE", "DEFAULT_SEED", "DEFAULT_START_ID", "MAX_RATE",
           "PACKAGE_ROOT", "REST_WEIGHTS", "ExchangeSimulator", "SimConfig", "SimulatorClient",
           "SimulatorError", "TickFeed", "encode_message", "main", "start_simulator", "stop_simulator",
           "trade_payloads"]
