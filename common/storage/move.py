"""Moving the feed to a new primary with no gap (`btcfeed primary move`), the library part.

The new primary gets the window through the same idempotent apply as everything else: first a copy of
every segment of the held index (what the local copy holds) while the live feed goes on to the old
primary; then, with the writer paused on the local copy, the few seconds written since. Only then is
the new primary recorded in the state dir (config.PRIMARY_OVERRIDE_FILE): the processes that talk to
the primary restart on it, and the replay of the pause's backlog hands the writer back to the new one.

The move is recorded in keys.MOVE with the command's pid. When the command dies with the writer
paused, sync notices (the pid is gone) and finishes the move if it was recorded already, or resumes
the feed on the old primary if not: a crash at any point leaves a consistent feed.
"""

import os
import socket
import time
import uuid
from typing import Callable, Dict, Optional, Sequence

from btcfeed import keys
from btcfeed.storage import writerstate
from btcfeed.storage.antientropy import HeldIndex, compare, resend

COPYING, SWITCHING, COMMITTED, DONE, ABANDONED = "copying", "switching", "committed", "done", "abandoned"
UNDER_WAY = (COPYING, SWITCHING, COMMITTED)
COPY_SEGMENTS = 16              # segments compared per round trip during the copy


def new_primary_epochs(target, sources: Sequence[str]) -> Dict[str, str]:
    """The epoch the new primary holds for each source (created if none; one a redundant host wrote
    there first is adopted)."""
    pipe = target.pipeline(transaction=False)
    for source in sources:
        pipe.hsetnx(keys.meta(source), "epoch", uuid.uuid4().hex)
        pipe.hget(keys.meta(source), "epoch")
    replies = pipe.execute()
    return {source: _text(replies[2 * i + 1]) for i, source in enumerate(sources)}


def copy_window(local, target, sources: Sequence[str], applier,
                progress: Optional[Callable[[str, int, int, int], None]] = None) -> int:
    """Apply to `target` every trade the local copy holds and it lacks, oldest segment first; returns
    the trades applied. progress(source, segments done, segments, trades applied so far)."""
    copied = 0
    for source in sources:
        index = HeldIndex(local, source)
        numbers = sorted(index.segments())
        for start in range(0, len(numbers), COPY_SEGMENTS):
            difference = compare(local, target, source, numbers[start:start + COPY_SEGMENTS])
            if difference.count:
                copied += resend(index, applier, difference, oldest_first=True).applied
            if progress:
                progress(source, min(start + COPY_SEGMENTS, len(numbers)), len(numbers), copied)
    return copied


def local_copy_ends(local, sources: Sequence[str]) -> Dict[str, dict]:
    """Where the mirror and the failover copy of each source end now."""
    return {source: HeldIndex(local, source).ends() for source in sources}


def index_caught_up(local, ends: Dict[str, dict]) -> bool:
    """Whether sync's held index has taken in the local copy up to these ends (what the writer wrote
    before it paused; what it writes after is the backlog, which the resume replays)."""
    return all(HeldIndex(local, source).has_taken_in(upto) for source, upto in ends.items())


# --- the record of a move -------------------------------------------------------------------------
def read_record(local) -> dict:
    return {_text(k): _text(v) for k, v in local.hgetall(keys.MOVE).items()}


def start_record(local, to: str, by: str) -> dict:
    record = {"phase": COPYING, "to": to, "pid": os.getpid(), "host": socket.gethostname(), "by": by,
              "started_ms": int(time.time() * 1000), "copied": 0, "paused": 0}
    pipe = local.pipeline(transaction=True)
    pipe.delete(keys.MOVE)
    pipe.hset(keys.MOVE, mapping=record)
    pipe.execute()
    return record


def set_phase(local, phase: str, **fields) -> None:
    local.hset(keys.MOVE, mapping={"phase": phase, **fields})


def owner_alive(record: dict) -> bool:
    """Whether the command that runs the move still runs (the local Redis is on this host, so is it)."""
    if record.get("host") != socket.gethostname():
        return True               # not ours to judge
    try:
        os.kill(int(record.get("pid") or 0), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return int(record.get("pid") or 0) > 0


def settle_orphaned(local) -> Optional[str]:
    """A move whose command died while the writer was paused for it: finish it when the new primary was
    recorded already, else resume the feed on the old primary. Returns what was done (an event name)."""
    record = read_record(local)
    if record.get("phase") not in UNDER_WAY or record.get("paused") != "1" or owner_alive(record):
        return None
    if writerstate.read_state(local) != writerstate.MAINTENANCE:
        return None
    if record["phase"] == COMMITTED:
        writerstate.resume(local)
        set_phase(local, DONE, finished_by="sync")
        return "move_finished"
    if record.get("was") != writerstate.MAINTENANCE:      # an operator's pause stays theirs
        writerstate.resume(local)
    set_phase(local, ABANDONED, abandoned_by="sync")
    return "move_abandoned"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
