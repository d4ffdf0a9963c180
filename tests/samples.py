"""Made-up inputs that more than one test module uses: websocket frames, byte streams cut at chosen
points, and batches of trades."""

import random
import time

from btcfeed.trade import Trade
from btcfeed.wsframes import OP_CONTINUATION, OP_PING, OP_PONG

NOW = int(time.time() * 1000) // 60000 * 60000   # make_trades' default: inside a day's window


def this_minute() -> int:
    """The start of this minute, for a window shorter than the time since NOW (taken at import)."""
    return int(time.time() * 1000) // 60000 * 60000


def frame(opcode, payload, fin=True, masked=False):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if masked else b"") + payload


def fragmented(opcode, payload, pieces):
    cuts = sorted(set(min(len(payload), c) for c in pieces))
    parts, last = [], 0
    for c in cuts + [len(payload)]:
        parts.append(payload[last:c])
        last = c
    parts = [p for p in parts if p] or [b""]
    out = b""
    for index, part in enumerate(parts):
        out += frame(opcode if index == 0 else OP_CONTINUATION, part, fin=index == len(parts) - 1)
    return out


def split_at(data: bytes, cuts) -> list:
    points = sorted(set(c % (len(data) + 1) for c in cuts))
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def fragments_with_pings(opcode, payload, cuts, pings):
    """A message as several frames, with ping/pong frames between the fragments."""
    parts = split_at(payload, cuts) if payload else [b""]
    parts = [p for p in parts if p] or [b""]
    data, controls = b"", []
    for index, part in enumerate(parts):
        data += frame(opcode if index == 0 else OP_CONTINUATION, part, fin=index == len(parts) - 1)
        if index < len(parts) - 1 and pings:
            control = (OP_PING if index % 2 else OP_PONG, b"p%d" % index)
            data += frame(*control)
            controls.append(control)
    return data, controls


def make_trades(first_id, count, seed=1, start_ts=NOW - 5 * 60000):
    rng = random.Random(seed)
    price = 4300000
    out = []
    for i in range(count):
        price += rng.randint(-50, 50)
        qty = rng.randint(1, 500000)
        out.append(Trade(first_id + i, "%d.%02d000000" % divmod(price, 100), "%d.%08d" % divmod(qty, 10 ** 8),
                         rng.choice(("buy", "sell")), start_ts + i * 37, start_ts + i * 37 + 5))
    return out
