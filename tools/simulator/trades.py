"""The simulator's trades: a seeded generator, their bounded history, and the texts of prices,
quantities and times the exchanges share."""

from __future__ import annotations

import array
import bisect
import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Iterator

HISTORY_CHUNK = 1 << 16                # trades per storage chunk; the oldest chunk is dropped whole

# Price: cents, a reflected random walk around 43,000.00. Quantity: lots of 0.00001 BTC (Binance's
# BTCUSDT step), drawn from a seeded lognormal table so one random draw decides a whole trade.
CENTER_PRICE_CENTS = 4_300_000
PRICE_BAND_CENTS = 50_000
PRICE_STEPS = (0,) * 12 + (1, -1) * 5 + (2, -2) * 2 + (5, -5, 10, -10, 25, -25)
QTY_LOT_UNITS = 1_000                  # one lot in units of 1e-8
QTY_TABLE_BITS = 12
QTY_MEDIAN_LOTS = 50
QTY_SIGMA = 1.6
QTY_MAX_LOTS = 200_000
UNITS_PER_COIN = 100_000_000

BOOL_TEXT = ("false", "true")


def price_text(cents: int) -> str:
    """A price in cents as Binance prints it: 8 decimals."""
    return f"{cents // 100}.{cents % 100:02d}000000"


def units_text(units: int) -> str:
    """An amount in units of 1e-8 as an 8-decimal string."""
    return f"{units // UNITS_PER_COIN}.{units % UNITS_PER_COIN:08d}"


def quote_qty_text(cents: int, qty_units: int) -> str:
    # cents * units is in 1e-10; quantities are whole lots (1e-5), so dividing by 100 is exact.
    return units_text(cents * qty_units // 100)


def iso_time(ms: int) -> str:
    """ISO-8601 UTC with microseconds, as Coinbase and Kraken v2 print trade times."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}000Z"


class TradeGenerator:
    """Seeded trade sequence: the k-th trade's price, qty and side depend only on the seed and k."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)
        self.qty_units = self._draw_qty_table()
        self.qty_text = tuple(units_text(units) for units in self.qty_units)
        self._price = CENTER_PRICE_CENTS

    def _draw_qty_table(self) -> tuple[int, ...]:
        mu = math.log(QTY_MEDIAN_LOTS)
        lots = (min(QTY_MAX_LOTS, max(1, round(self._rng.lognormvariate(mu, QTY_SIGMA))))
                for _ in range(1 << QTY_TABLE_BITS))
        return tuple(n * QTY_LOT_UNITS for n in lots)

    def next_batch(self, count: int) -> tuple[array.array, array.array, bytearray]:
        """The next `count` trades as (price cents, qty table index, isBuyerMaker 0/1)."""
        prices, qty_index, sides = array.array("i"), array.array("H"), bytearray()
        add_price, add_qty, add_side = prices.append, qty_index.append, sides.append
        getrandbits, steps = self._rng.getrandbits, PRICE_STEPS
        low, high = CENTER_PRICE_CENTS - PRICE_BAND_CENTS, CENTER_PRICE_CENTS + PRICE_BAND_CENTS
        qty_mask = (1 << QTY_TABLE_BITS) - 1
        price = self._price
        for _ in range(count):
            # One draw per trade: 5 bits of price step, 12 bits of qty, 1 bit of side.
            bits = getrandbits(18)
            step = steps[bits & 31]
            price += step
            if price < low or price > high:
                price -= 2 * step          # reflect at the band so the walk stays around the centre
            add_price(price)
            add_qty((bits >> 5) & qty_mask)
            add_side(bits >> 17)
        self._price = price
        return prices, qty_index, sides


class HistoryChunk:
    """Up to HISTORY_CHUNK consecutive trades, 15 bytes each."""

    __slots__ = ("prices", "qty_index", "times", "sides")

    def __init__(self):
        self.prices = array.array("i")
        self.qty_index = array.array("H")
        self.times = array.array("q")
        self.sides = bytearray()


@dataclass
class TradeSlice:
    """Retained trades first_id.. as parallel sequences (copies, safe to read from another thread)."""
    first_id: int
    prices: array.array
    qty_index: array.array
    times: array.array
    sides: bytes


class TradeHistory:
    """Every generated trade, oldest dropped beyond max_trades, stored in fixed-size chunks."""

    def __init__(self, start_id: int, max_trades: int, chunk_size: int = HISTORY_CHUNK):
        self.max_trades = max_trades
        self.chunk_size = chunk_size
        self.first_id = start_id       # oldest retained id
        self.next_id = start_id        # id the next trade gets
        self._base_id = start_id       # id of the first slot of _chunks[0]
        self._chunks: list[HistoryChunk] = []

    @property
    def last_id(self) -> int:
        return self.next_id - 1

    def append(self, prices: array.array, qty_index: array.array, sides: bytearray, time_ms: int) -> None:
        done, count = 0, len(prices)
        while done < count:
            chunk = self._writable_chunk()
            take = min(count - done, self.chunk_size - len(chunk.prices))
            chunk.prices.extend(prices[done:done + take])
            chunk.qty_index.extend(qty_index[done:done + take])
            chunk.times.extend(array.array("q", (time_ms,)) * take)
            chunk.sides.extend(sides[done:done + take])
            done += take
        self.next_id += count
        self._forget_beyond_bound()

    def _writable_chunk(self) -> HistoryChunk:
        if not self._chunks or len(self._chunks[-1].prices) == self.chunk_size:
            self._chunks.append(HistoryChunk())
        return self._chunks[-1]

    def _forget_beyond_bound(self) -> None:
        self.first_id = max(self.first_id, self.next_id - self.max_trades)
        while self._chunks and self._base_id + self.chunk_size <= self.first_id:
            self._chunks.pop(0)
            self._base_id += self.chunk_size

    def first_id_after_time(self, time_ms: int) -> int:
        """The id of the oldest retained trade printed after time_ms (next_id when there is none);
        times never go backwards along the ids, so each chunk's times are sorted."""
        for index, chunk in enumerate(self._chunks):
            if chunk.times and chunk.times[-1] > time_ms:
                base = self._base_id + index * self.chunk_size
                return max(self.first_id, base + bisect.bisect_right(chunk.times, time_ms))
        return self.next_id

    def slices(self, from_id: int, to_id: int) -> Iterator[TradeSlice]:
        """Retained trades with from_id <= id <= to_id, one slice per chunk touched."""
        from_id, to_id = max(from_id, self.first_id), min(to_id, self.last_id)
        while from_id <= to_id:
            index, offset = divmod(from_id - self._base_id, self.chunk_size)
            chunk = self._chunks[index]
            end = min(self.chunk_size, offset + to_id - from_id + 1, len(chunk.prices))
            yield TradeSlice(from_id, chunk.prices[offset:end], chunk.qty_index[offset:end],
                             chunk.times[offset:end], bytes(chunk.sides[offset:end]))
            from_id += end - offset


def trade_rows(slices: list[TradeSlice]) -> Iterator[tuple[int, int, int, int, int]]:
    """(id, cents, qty index, ms, isBuyerMaker) of every trade in the slices."""
    for part in slices:
        yield from zip(itertools.count(part.first_id), part.prices, part.qty_index, part.times, part.sides)
