"""The price view: one price for the host, from the first source in BTCFEED_PRICE_SOURCES that is live.

A source is live while its newest trade was received within BTCFEED_PRICE_STALE_MS. When the source
giving the price goes quiet and another one is live, the price comes from the most preferred live
source; when a more preferred source is live again, the price returns to it. With no source live
nothing changes: a quiet market is not a reason to switch.

The writer keeps one selector, feeds it the newest trade of every batch it writes, and writes the
view (keys.PRICE) with the same round trip as the batches; the compatibility keys follow the same
source. Each switch is an event.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import orjson

from btcfeed import keys

# The quote currency of each exchange's symbol form (config.SYMBOL_FORMS): BTC-USD, BTC/USD, BTCUSDT.
KNOWN_QUOTES = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USD", "EUR", "GBP", "JPY", "BTC", "ETH")


def quote_of(source: str) -> str:
    """The quote currency of a source 'exchange:SYMBOL' ('' when the symbol does not say)."""
    symbol = source.partition(":")[2]
    for separator in ("-", "/"):
        if separator in symbol:
            return symbol.rpartition(separator)[2]
    return next((quote for quote in KNOWN_QUOTES if symbol.endswith(quote) and symbol != quote), "")


def newest_row(payload: bytes) -> list:
    """The last (newest) row of a bus batch, [id, p, q, side, ts, rts, units], without decoding the
    rest: rows are in id order and hold no '['."""
    return orjson.loads(payload[payload.rindex(b"["):-1])


@dataclass(frozen=True)
class Switch:
    source: str
    previous: Optional[str]
    reason: str


class PriceSelector:
    def __init__(self, order: Sequence[str], stale_ms: int, current: str = None, current_id: int = -1):
        self.order = list(order)
        self.stale_ms = stale_ms
        self.current = current if current in self.order else None
        self.since_ms = 0
        self.newest: Dict[str, list] = {}          # source -> newest row seen
        self.heard_ms: Dict[str, int] = {}         # source -> when its newest trade was received
        self.written_id = current_id if self.current else -1
        self.changed = False

    def observe(self, source: str, row: list) -> None:
        """A batch of the source was written; row is its newest trade."""
        if source not in self.order:
            return
        known = self.newest.get(source)
        if known is None or row[0] > known[0]:
            self.newest[source] = row
        self.heard_ms[source] = max(self.heard_ms.get(source, 0), int(row[5]))

    def live(self, source: str, now_ms: int) -> bool:
        return now_ms - self.heard_ms.get(source, -self.stale_ms - 1) <= self.stale_ms

    def choose(self, now_ms: int) -> Optional[Switch]:
        """Move to the most preferred live source when it is not the current one; the switch, or None."""
        best = next((source for source in self.order if self.live(source, now_ms)), None)
        if best is None or best == self.current:
            return None
        previous = self.current
        if previous is None:
            reason = "first trade"
        elif self.order.index(best) < self.order.index(previous):
            reason = "preferred source live again"
        else:
            reason = f"{previous} quiet for more than {self.stale_ms} ms"
        self.current, self.since_ms, self.written_id = best, now_ms, -1
        return Switch(best, previous, reason)

    def update(self, now_ms: int) -> Optional[dict]:
        """The view to write now (a hash mapping), or None when the price has not moved since the last
        one: the current source's newest trade only ever moves forward."""
        row = self.newest.get(self.current) if self.current else None
        if row is None or row[0] <= self.written_id:
            return None
        self.written_id = row[0]
        return view_fields(self.current, row, self.since_ms or now_ms)


def view_fields(source: str, row: list, since_ms: int) -> dict:
    trade_id, price, qty, side, ts, rts = row[:6]
    return {"source": source, "quote": quote_of(source), "p": price, "q": qty, "side": side,
            "id": str(trade_id), "ts": str(ts), "rts": str(rts), "since": str(since_ms)}


# The primary's price view may be written by several feed hosts (each with its own selector): a host a
# few milliseconds behind must not put back an older trade of the same source. A write of the same
# source is kept only when its trade id is higher; a write of another source is a host's switch and
# is kept. KEYS[1] the view; ARGV its field/value pairs (view_fields), source first, id among them.
WRITE_VIEW_LUA = """
local source, id
for i = 1, #ARGV, 2 do
  if ARGV[i] == 'source' then source = ARGV[i + 1] elseif ARGV[i] == 'id' then id = tonumber(ARGV[i + 1]) end
end
local stored = redis.call('HMGET', KEYS[1], 'source', 'id')
if stored[1] == source and tonumber(stored[2]) and tonumber(stored[2]) >= id then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def write_view_command(view: dict) -> tuple:
    """The command that stores the view in a primary shared by several hosts (see WRITE_VIEW_LUA)."""
    return ("EVAL", WRITE_VIEW_LUA, 1, keys.PRICE, *[part for item in view.items() for part in item])


def read_view(client) -> dict:
    """The price view as stored (keys.PRICE), text fields; {} when none was written yet."""
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.PRICE).items()}


def compat_source_now(local, config) -> Optional[str]:
    """The source the compatibility keys follow: the price view's, as the writer last stored it in the
    local Redis (the configured first source before any), or None when the keys are off."""
    if config.compat_source is None:
        return None
    stored = local.hget(keys.PRICE, "source")
    names = [source.name for source in config.sources]
    return stored.decode() if stored and stored.decode() in names else config.compat_source.name
