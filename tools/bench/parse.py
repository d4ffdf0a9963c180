"""bin/btcfeed bench-parse: websocket frame reassembly and Binance parsing on one core, in messages/s.

Builds realistic Binance trade messages as server frames (unmasked, as servers send them) and times,
over the same bytes: (a) frame reading plus document splitting of the byte stream in socket-sized
reads, (b) parse_binance_ws per message, (c) both together: once splitting every message into documents,
and once as parse_socket_read (ingest's hot path: a lone document is parsed without a scan). Each
figure is the median of several runs, compared with the 200,000 messages/s target.

Frame reading alone is also timed with the libraries the field uses, over the same bytes: wsproto's
frame protocol and websocket-client's frame buffer, and in 16 KiB reads too (one TLS record, what a
TLS socket hands over at a time in production) besides ingest's 256 KiB reads.
"""

import os
import random
import statistics
import time

import orjson

from btcfeed.trade import parse_binance_ws, parse_socket_read
from btcfeed.wsframes import OP_TEXT, FrameReader, Reassembler

TARGET_MSGS_PER_S = 200_000
READ_BYTES = 1 << 18            # one socket read in ingest
TLS_RECORD_BYTES = 1 << 14      # a TLS socket returns at most one record (16 KiB) per read
MAX_MESSAGE_BYTES = 1 << 20
SYMBOL = "BTCUSDT"
FORMS = ("raw", "combined", "ndjson")
DOCUMENTS_PER_NDJSON_MESSAGE = 10


def trade_documents(n: int, kind: str = "trade", seed: int = 1) -> list:
    """n consecutive Binance trade events as the exchange writes them (compact JSON, fixed key order)."""
    rng = random.Random(seed)
    price, first_id, t0 = 43210.01, 3_141_592_653, 1_700_000_000_000
    docs = []
    for index in range(n):
        price = max(1.0, price + rng.choice((-0.01, 0.0, 0.0, 0.01)))
        record = {"e": kind, "E": t0 + index + 1, "s": SYMBOL}
        record["t" if kind == "trade" else "a"] = first_id + index
        record.update(p=f"{price:.8f}", q=f"{rng.randint(1, 5_000_000) / 1e8:.8f}")
        if kind == "aggTrade":
            record.update(f=first_id * 2 + index, l=first_id * 2 + index)
        record.update(T=t0 + index, m=rng.random() < 0.5, M=True)
        docs.append(orjson.dumps(record))
    return docs


def combined_form(docs: list, kind: str = "trade") -> list:
    stream = f'{SYMBOL.lower()}@{kind}'.encode()
    return [b'{"stream":"' + stream + b'","data":' + doc + b'}' for doc in docs]


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return header + payload


def wire_for(form: str, n: int) -> tuple:
    """(the documents, the byte stream of frames that carries them) for one message form."""
    docs = trade_documents(n)
    if form == "combined":
        docs = combined_form(docs)
    if form == "ndjson":
        step = DOCUMENTS_PER_NDJSON_MESSAGE
        messages = [b"\n".join(docs[i:i + step]) + b"\n" for i in range(0, n, step)]
    else:
        messages = docs
    return docs, b"".join(server_frame(m) for m in messages)


def reads_of(wire: bytes, size: int = READ_BYTES) -> list:
    return [wire[i:i + size] for i in range(0, len(wire), size)]


def time_frames_only(reads: list) -> tuple:
    """FrameReader alone (no document splitting), for comparison."""
    reader, count = FrameReader(MAX_MESSAGE_BYTES), 0
    started = _clock()
    for data in reads:
        count += len(reader.feed(data))
    return _since(started), count


def time_wsproto_frames(reads: list) -> tuple:
    """wsproto's frame protocol (the parser under its WSConnection), client side: servers do not mask."""
    from wsproto.frame_protocol import FrameProtocol
    protocol, count = FrameProtocol(client=True, extensions=[]), 0
    started = _clock()
    for data in reads:
        protocol.receive_bytes(data)
        for frame in protocol.received_frames():
            count += frame.message_finished     # a frame cut by a read comes out in pieces
    return _since(started), count


def time_websocket_client_frames(reads: list) -> tuple:
    """websocket-client's frame buffer, fed by a recv that hands over the reads as a socket would."""
    from websocket._abnf import frame_buffer
    pending = {"data": memoryview(b""), "reads": iter(reads)}

    def recv(size: int) -> bytes:
        if not pending["data"]:
            pending["data"] = memoryview(next(pending["reads"], b""))
        piece, pending["data"] = pending["data"][:size], pending["data"][size:]
        return bytes(piece)

    frames, count = frame_buffer(recv, True), 0
    total = sum(len(data) for data in reads)
    started = _clock()
    consumed = 0
    while consumed < total:
        frame = frames.recv_frame()
        consumed += len(frame.data) + (2 if len(frame.data) < 126 else 4 if len(frame.data) < 1 << 16 else 10)
        count += 1
    return _since(started), count


def time_reassembly(reads: list) -> tuple:
    reassembler, count = Reassembler(MAX_MESSAGE_BYTES), 0
    started = _clock()
    for data in reads:
        count += len(reassembler.feed(data))
    return _since(started), count


def time_parsing(docs: list) -> tuple:
    parse, rts, count = parse_binance_ws, 1_700_000_000_000, 0
    started = _clock()
    for doc in docs:
        if parse(doc, SYMBOL, rts) is not None:
            count += 1
    return _since(started), count


def time_hot_path(reads: list) -> tuple:
    """Socket reads in, trades out, as ingest should run it: parse_socket_read (split only on need)."""
    reassembler, count = Reassembler(MAX_MESSAGE_BYTES), 0
    started = _clock()
    for data in reads:
        rts = int(time.time() * 1000)
        trades, rejects, _ = parse_socket_read(reassembler, data, parse_binance_ws, SYMBOL, rts)
        if rejects:
            raise RuntimeError(f"valid trades rejected: {rejects[0][0]}")
        count += len(trades)
    return _since(started), count


def time_both(reads: list) -> tuple:
    """Socket reads in, trades out, every message split into documents before parsing."""
    reassembler, parse, count = Reassembler(MAX_MESSAGE_BYTES), parse_binance_ws, 0
    started = _clock()
    for data in reads:
        rts = int(time.time() * 1000)
        for opcode, payload in reassembler.feed(data):
            if opcode == OP_TEXT and parse(payload, SYMBOL, rts) is not None:
                count += 1
    return _since(started), count


def _clock() -> tuple:
    return time.process_time(), time.perf_counter()


def _since(started: tuple) -> tuple:
    # CPU seconds of this process (what one core spent, whatever else the machine runs) and wall seconds.
    return time.process_time() - started[0], time.perf_counter() - started[1]


def median_rate(measure, argument, expected: int, documents: int, runs: int) -> tuple:
    """Documents (trade messages) per CPU second and per wall second, medians over runs (counts checked)."""
    cpu_rates, wall_rates = [], []
    for _ in range(runs):
        (cpu_s, wall_s), count = measure(argument)
        if count != expected:
            raise RuntimeError(f"{measure.__name__} saw {count} items, expected {expected}")
        cpu_rates.append(documents / max(cpu_s, 1e-9))
        wall_rates.append(documents / wall_s)
    return statistics.median(cpu_rates), statistics.median(wall_rates)


def pin_to_one_core() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity here)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def run_parse_bench(n: int = 200_000, runs: int = 5, forms=FORMS, echo=print) -> int:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    echo(f"bench-parse: {n:,} Binance trade messages per run, median of {runs} runs, "
         f"{READ_BYTES // 1024} KiB reads; {pin_to_one_core()}; "
         f"load average {load:.1f} on {os.cpu_count()} cores")
    echo(f"target: {TARGET_MSGS_PER_S:,} messages/s on one core")
    echo("messages/s per CPU second of this process (the figure compared with the target), "
         "and per wall second")
    echo(f"{'form':<9} {'stage':<34} {'msgs/CPU-s':>12} {'vs target':>10} {'µs/msg':>8} {'msgs/wall-s':>12}")
    below = []
    for form in forms:
        docs, wire = wire_for(form, n)
        reads = reads_of(wire)
        frames_expected = n if form != "ndjson" else -(-n // DOCUMENTS_PER_NDJSON_MESSAGE)
        tls_reads = reads_of(wire, TLS_RECORD_BYTES)
        stages = [
            ("frames only (FrameReader)", time_frames_only, reads, frames_expected),
            ("frames only, 16 KiB (FrameReader)", time_frames_only, tls_reads, frames_expected),
            ("frames only (wsproto)", time_wsproto_frames, reads, frames_expected),
            ("frames only, 16 KiB (wsproto)", time_wsproto_frames, tls_reads, frames_expected),
            ("frames only (websocket-client)", time_websocket_client_frames, reads, frames_expected),
            ("(a) frames + document split", time_reassembly, reads, n),
            ("(b) parse_binance_ws", time_parsing, docs, n),
            ("(c) both: split every message", time_both, reads, n),
            ("(c) both: parse_socket_read", time_hot_path, reads, n),
        ]
        for label, measure, argument, expected in stages:
            rate, wall_rate = median_rate(measure, argument, expected, n, runs)
            echo(f"{form:<9} {label:<34} {rate:>12,.0f} {rate / TARGET_MSGS_PER_S:>9.2f}x {1e6 / rate:>8.2f} "
                 f"{wall_rate:>12,.0f}")
            if measure is time_hot_path and rate < TARGET_MSGS_PER_S:
                below.append(form)
    if below:
        echo(f"below target end to end for: {', '.join(below)}")
    else:
        echo("end to end at or above target for every form")
    return 0
