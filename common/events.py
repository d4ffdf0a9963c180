"""State changes (failover, drain, hand-back, re-seed, repair, crashes) as events in the local Redis."""

import json
import time

import redis

from btcfeed import keys

EVENTS_MAX = 10_000


def record_event(client, log, process: str, event: str, level: str = "info", **fields) -> None:
    """Log the event and append it to the bounded events stream; the log line is kept even if Redis is
    down."""
    getattr(log, level)(event, **fields)
    entry = {"ts": int(time.time() * 1000), "proc": process, "event": event, "level": level,
             "fields": json.dumps(fields, default=str)}
    try:
        client.xadd(keys.EVENTS, entry, maxlen=EVENTS_MAX, approximate=True)
    except redis.RedisError:
        log.warning("event_not_recorded", name=event)


def recent_events(client, count: int = 20) -> list:
    out = []
    for entry_id, fields in client.xrevrange(keys.EVENTS, count=count):
        item = {k.decode(): v.decode() for k, v in fields.items()}
        item["fields"] = json.loads(item.get("fields") or "{}")
        item["ts"] = int(item["ts"])
        out.append(item)
    return out
