"""The primary's per-source epoch: how the feed host *knows* the primary still holds btcfeed's data.

The apply script refuses a batch when the primary does not hold the epoch the feed host expects
(common/storage/apply_batch.lua), so a flush, a restart without data or a replica that never had the data is
refused at the very first write after the loss, not guessed from run ids or missing keys. sync (and
the writer at its start) establishes the epochs: it adopts the one the primary holds (written by this
host before, or by a redundant host) or creates one, and any change since the last time means the
primary may lack anything, so a full anti-entropy sweep follows.
"""

import uuid
from typing import Dict, List, Sequence

from btcfeed import keys


def known_epochs(local) -> Dict[str, str]:
    """source -> the epoch this host last verified in the primary."""
    return {_text(k): _text(v) for k, v in local.hgetall(keys.EPOCHS).items()}


def establish(local, primary, sources: Sequence[str]) -> List[str]:
    """Make the primary hold an epoch for every source and record it locally; the sources whose epoch
    is new to this host (the primary may lack anything the local copy holds)."""
    known = known_epochs(local)
    pipe = primary.pipeline(transaction=False)
    for source in sources:
        # HSETNX: an epoch another host (or this one) wrote is adopted, never replaced.
        pipe.hsetnx(keys.meta(source), "epoch", uuid.uuid4().hex)
        pipe.hget(keys.meta(source), "epoch")
    replies = pipe.execute()
    changed = []
    for index, source in enumerate(sources):
        held = _text(replies[2 * index + 1])
        if known.get(source) != held:
            local.hset(keys.EPOCHS, source, held)
            changed.append(source)
    return changed


def primary_epochs(primary, sources: Sequence[str]) -> Dict[str, str]:
    """source -> the epoch the primary holds now ('' when it holds none)."""
    pipe = primary.pipeline(transaction=False)
    for source in sources:
        pipe.hget(keys.meta(source), "epoch")
    return {source: _text(value) if value else "" for source, value in zip(sources, pipe.execute())}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
