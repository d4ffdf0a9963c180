"""Every Redis key, stream and channel name btcfeed uses, built in this one place."""

PREFIX = "btcfeed"

# Trade ids are split into bitmap segments of 2**16 bits (8 KiB each) for the seen-set.
SEEN_SEGMENT_BITS = 16

# --- per source, in the primary and (same layout) in the local failover copy ------------------


def source_tag(source: str) -> str:
    """The hash tag that keeps all of a source's keys in one Redis Cluster slot."""
    return "{%s}" % source


def trades(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:trades"


def last(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:last"


def candles_index(source: str) -> str:
    """Sorted set of minute start times (ms) that have a candle hash."""
    return f"{PREFIX}:{source_tag(source)}:candles:1m"


def candle(source: str, minute_ms: int) -> str:
    return f"{PREFIX}:{source_tag(source)}:candles:1m:{minute_ms}"


def candle_prefix(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:candles:1m:"


def mirror(source: str) -> str:
    """Local Redis only: the batches applied to a healthy primary, one stream entry per batch (the
    bus payload), kept for the retention window so a re-seed or sync-check can read them back."""
    return f"{PREFIX}:{source_tag(source)}:mirror"


def meta(source: str) -> str:
    """Hash of the apply script's own state per source: epoch (the token the feed host expects),
    floor (every id below it counts as seen) and lowseg (the lowest seen segment that may exist)."""
    return f"{PREFIX}:{source_tag(source)}:meta"


def live_channel(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:live"


def seen_prefix(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:seen:"


def seen_segment(source: str, trade_id: int) -> str:
    return f"{seen_prefix(source)}{trade_id >> SEEN_SEGMENT_BITS}"


def setrange_probe(source: str) -> str:
    """Never written: an empty SETRANGE on it asks whether the feed's ACL allows the command."""
    return f"{seen_prefix(source)}setrange-allowed"


# --- local Redis only: the held index (what the local copy holds, in the seen-set's layout) -----
def held_prefix(source: str) -> str:
    """Bitmap segments of the trade ids the local copy holds (mirror and failover copy)."""
    return f"{PREFIX}:{source_tag(source)}:held:"


def held_where(source: str) -> str:
    """Hash 'm<segment>' / 't<segment>' -> 'first last' entry ids of the mirror / failover-copy
    entries that hold the segment's trades: where a re-send finds them."""
    return f"{PREFIX}:{source_tag(source)}:heldwhere"


def held_cursor(source: str) -> str:
    """Hash 'm' / 't' -> the last mirror / failover-copy entry id the held index has taken in."""
    return f"{PREFIX}:{source_tag(source)}:heldcursor"


# Hash source -> the newest mirror entry whose batch the primary confirmed (written by the writer with
# its ACK): the held index takes in mirror entries up to it, never a batch still on its way.
MIRROR_CONFIRMED = f"{PREFIX}:mirror:confirmed"


# --- local Redis only: the read view the api process serves (DESIGN section 6b) ---------------------
def view(source: str) -> str:
    """Stream of the source's trades in id order and without a hole: one entry per run of consecutive
    ids (the bus payload format), its entry id '<first trade id>-0', so a trade id finds its entry."""
    return f"{PREFIX}:{source_tag(source)}:view"


def view_state(source: str) -> str:
    """Hash kept with each append to the view: next (the next trade id it waits for) and where a
    restarted builder reads the mirror and the failover copy again from."""
    return f"{PREFIX}:{source_tag(source)}:viewstate"


def view_wake(source: str) -> str:
    """List holding at most one token: pushed when a batch reached the mirror or the failover copy
    without the writer appending it to the view itself, so the view builder wakes and does it."""
    return f"{PREFIX}:{source_tag(source)}:viewwake"


# Hash: the price view, in the primary and in the local Redis: source, quote, p, q, id, ts, rts,
# since (ms, when this source became the price source). It follows BTCFEED_PRICE_SOURCES in order.
PRICE = f"{PREFIX}:price"


def held_scratch(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:heldscratch"


# --- compatibility keys of the original omega_ai feed (not source-tagged by contract) ---------
COMPAT_LAST_PRICE = "last_btc_price"
COMPAT_LAST_UPDATE = "last_btc_update_time"
COMPAT_HISTORY = "btc_movement_history"
COMPAT_CHANNEL = "btc_price"

# --- local Redis only: the bus between processes -----------------------------------------------
BUS = f"{PREFIX}:bus"
BUS_GROUP = "writers"
DEADLETTER = f"{PREFIX}:deadletter"
EVENTS = f"{PREFIX}:events"


def cursor(source: str) -> str:
    """Highest trade id of a source that is durable on the bus (written with the same XADD)."""
    return f"{PREFIX}:{source_tag(source)}:cursor"


def gaps(source: str) -> str:
    """Hash of the source's missing id ranges (and the open catch-up) that the backfill fills."""
    return f"{PREFIX}:{source_tag(source)}:gaps"


def source_stats(source: str) -> str:
    return f"{PREFIX}:{source_tag(source)}:stats"


def heartbeat(process: str) -> str:
    return f"{PREFIX}:heartbeat:{process}"


def primary_keys(source: str) -> list:
    """The fixed keys a batch apply touches (seen segments and candle hashes are added per batch)."""
    return [trades(source), last(source), candles_index(source), meta(source)]

# --- local Redis only: failover ------------------------------------------------------------------
BACKLOG = f"{PREFIX}:backlog"
# String: the trades the backlog's entries hold (storage/backlog.py keeps it with the entries).
BACKLOG_TRADES = f"{PREFIX}:backlog:trades"
# Hash: state (primary | failover | draining), since (ms), reason. The writer moves it to
# failover; sync moves it to draining and, atomically with an empty backlog, back to primary.
WRITER_STATE = f"{PREFIX}:writer:state"
# Hash kept by sync: what it knows of the primary (run_id, last probe), for re-seed decisions.
SYNC_PRIMARY = f"{PREFIX}:sync:primary"
# List: a token pushed with every change of the writer state (writerstate.set_state); sync waits on it
# between rounds while the writer uses the primary, so it starts probing the moment the writer fails
# over instead of polling the state several times a second.
SYNC_WAKE = f"{PREFIX}:sync:wake"

# Hash source -> the epoch the primary holds for it, as sync last verified (and re-seeded against);
# the writer's apply script refuses a primary that holds another one.
EPOCHS = f"{PREFIX}:epochs"
# Hash kept by the writer while the local Redis is at its memory limit: since (ms), reason, trimmed.
LOCAL_PRESSURE = f"{PREFIX}:local:pressure"
# Hash source -> the time (ms) of the oldest entry the writer left in the source's mirror or failover
# copy when the memory limit made it drop older ones: the local copy starts there, later than the
# retention window asks, until that time itself falls out of the window (health says so meanwhile).
LOCAL_WINDOW_CUT = f"{PREFIX}:local:window-cut"

# Hash: the move to a new primary under way (`btcfeed primary move`): phase (copying, switching,
# committed, done, abandoned), to (redacted), pid and host of the command, by, started_ms, copied.
MOVE = f"{PREFIX}:move"

# String: the version of the local Redis's data format (common/storage/schema.py), set by the writer.
SCHEMA = f"{PREFIX}:schema"

# A short-lived key sync writes to check that the primary accepts writes (OOM, READONLY, ACL).
PROBE = f"{PREFIX}:probe"


def source_probe(source: str) -> str:
    """On a Redis Cluster: the probe key in a source's own slot, so its master is the one tested."""
    return f"{PREFIX}:{source_tag(source)}:probe"

# --- local Redis only: observability ---------------------------------------------------------------
# Hash process name -> restarts after a crash, counted by the supervisord event listener.
PROCESS_RESTARTS = f"{PREFIX}:process:restarts"
