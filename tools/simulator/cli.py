"""The simulator's command line: `python -m tools.simulator --port 0 --port-file PATH [--mode ...]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional

from tools.simulator.server import (DEFAULT_HISTORY_MAX, DEFAULT_MAX_CONN_SECONDS, DEFAULT_MAX_SEND_BUFFER,
                                    DEFAULT_PING_INTERVAL, DEFAULT_PONG_TIMEOUT, DEFAULT_RATE, DEFAULT_SEED,
                                    DEFAULT_START_ID, DEFAULT_SYMBOLS, MAX_RATE, MODE_SYMBOL_PATTERNS, MODES,
                                    ExchangeSimulator, SimConfig)

log = logging.getLogger("exchange_sim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.simulator",
        description="Exchange simulator (websocket + REST on one port): Binance spot, Coinbase Exchange "
                    "or Kraken v2.")
    parser.add_argument("--mode", choices=MODES, default="binance",
                        help="which exchange to speak (default binance)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="trades per second (up to 100000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the price/qty/side sequence")
    parser.add_argument("--symbol", default=None,
                        help="symbol traded, in the mode's form (default BTCUSDT, BTC-USD or BTC/USD)")
    parser.add_argument("--start-id", type=int, default=DEFAULT_START_ID, help="id of the first trade")
    parser.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL,
                        help="seconds between server pings")
    parser.add_argument("--pong-timeout", type=float, default=DEFAULT_PONG_TIMEOUT,
                        help="close a connection whose pong is this late (seconds)")
    parser.add_argument("--max-conn-seconds", type=float, default=DEFAULT_MAX_CONN_SECONDS,
                        help="close connections older than this")
    parser.add_argument("--history-max", type=int, default=DEFAULT_HISTORY_MAX, help="trades kept for REST")
    parser.add_argument("--max-send-buffer", type=int, default=DEFAULT_MAX_SEND_BUFFER,
                        help="bytes queued for one client before it is dropped as too slow")
    parser.add_argument("--paused", action="store_true", help="start with the trade clock paused")
    return parser


def config_from_args(argv: Optional[list[str]]) -> SimConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.symbol is None:
        args.symbol = DEFAULT_SYMBOLS[args.mode]
    checks = [
        (0 < args.rate <= MAX_RATE, f"--rate must be within (0, {MAX_RATE:.0f}]"),
        (0 <= args.port <= 65535, "--port must be within [0, 65535]"),
        (MODE_SYMBOL_PATTERNS[args.mode].match(args.symbol) is not None,
         "--symbol must be upper case letters and digits" if args.mode == "binance"
         else f"--symbol must be a {args.mode} symbol like {DEFAULT_SYMBOLS[args.mode]}"),
        (args.start_id >= 0, "--start-id must not be negative"),
        (args.ping_interval > 0, "--ping-interval must be positive"),
        (args.pong_timeout > 0, "--pong-timeout must be positive"),
        (args.max_conn_seconds > 0, "--max-conn-seconds must be positive"),
        (args.history_max >= 1, "--history-max must be at least 1"),
        (args.max_send_buffer >= 1024, "--max-send-buffer must be at least 1024"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return SimConfig(host=args.host, port=args.port, port_file=args.port_file, rate=args.rate, seed=args.seed,
                     symbol=args.symbol, start_id=args.start_id, ping_interval=args.ping_interval,
                     pong_timeout=args.pong_timeout, max_conn_seconds=args.max_conn_seconds,
                     history_max=args.history_max, max_send_buffer=args.max_send_buffer, paused=args.paused,
                     mode=args.mode)


async def run_simulator(config: SimConfig) -> None:
    await ExchangeSimulator(config).serve()


def main(argv: Optional[list[str]] = None) -> int:
    config = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s exchange_sim %(levelname)s %(message)s")
    try:
        asyncio.run(run_simulator(config))
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.host, config.port, exc)
        return 1
    return 0
