"""The data format of the local Redis (bus, cursors, gap records, mirror, failover copy, backlog, held
index), as one version number in keys.SCHEMA.

The writer records VERSION at its start when the key is absent, and refuses to start on a local Redis
whose version this code does not read (one written by a newer btcfeed, after a downgrade): it would
misread what it does not know. `btcfeed upgrade-check` reads the same key before an upgrade. A local
Redis without the key was written before versions were recorded, in format 1.
"""

from typing import Optional

from btcfeed import keys

VERSION = 1
READABLE = (1,)
UNRECORDED = 1          # the format of a local Redis written before the key existed


def recorded(local) -> Optional[int]:
    """The version the local Redis records; None when it records none; -1 when the value is not a number."""
    value = local.get(keys.SCHEMA)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return -1


def readable(version: Optional[int]) -> bool:
    return (UNRECORDED if version is None else version) in READABLE


def problem(version: Optional[int]) -> Optional[str]:
    """None when this code reads the local Redis's data; else one line saying why it does not."""
    if readable(version):
        return None
    if version is not None and version > VERSION:
        return (f"the local Redis holds data format {version}, written by a newer btcfeed; this code "
                f"reads {', '.join(map(str, READABLE))}: run the newer btcfeed on this state dir, or start "
                "from an empty one")
    return f"the local Redis holds data format {version!r}, which this code does not read (it reads " \
           f"{', '.join(map(str, READABLE))})"


def claim(local) -> Optional[int]:
    """At the writer's start: record VERSION when no version is recorded; the version found before."""
    found = recorded(local)
    if found is None:
        local.set(keys.SCHEMA, VERSION, nx=True)
    return found
