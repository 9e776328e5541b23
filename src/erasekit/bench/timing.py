"""How long a bench directory took: ``DIR/timing.json``, one session per invocation of the bench.

Each session is its start (UTC, to the second), its length in seconds and whether it ran anything (a
``--table-only`` invocation did not). The shards of one bench (``scripts/bench_shards.sh``) append to the same
file and end at about the same time, so every read-modify-write holds :func:`erasekit.io.locked` on the
directory. The file also holds the two totals of :class:`Timing`, for a reader without erasekit.
"""

from __future__ import annotations

import calendar
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.io import atomic_write_json, locked, normal, read_json

TIMING_FILE = "timing.json"
START_FORMAT = "%Y-%m-%d %H:%M:%S"  # a session's start, UTC


@dataclass(frozen=True)
class Timing:
    """``wall``: elapsed seconds, sessions that overlapped (shards side by side) counted once; ``summed``: every
    session's length added up (two shards side by side count twice). Sessions that ran nothing are left out."""

    wall: float
    summed: float

    @classmethod
    def of(cls, sessions: Sequence[Mapping[str, Any]]) -> Timing:
        """The totals of ``sessions`` (as stored in ``timing.json``)."""
        spans = sorted((_epoch(s["start"]), _epoch(s["start"]) + s["seconds"]) for s in sessions if s["ran"])
        wall, end = 0.0, float("-inf")
        for a, b in spans:  # the union of the spans: only what lies past the furthest end so far is new
            wall += max(0.0, b - max(a, end))
            end = max(end, b)
        return cls(wall=round(wall, 1), summed=round(sum(b - a for a, b in spans), 1))

    @classmethod
    def read(cls, file: Path) -> Timing | None:
        """The totals of a ``timing.json`` (``None`` when there is none yet)."""
        return cls.of(read_json(file)["sessions"]) if file.is_file() else None

    def describe(self) -> str:
        """One sentence for the pages."""
        return (f"{self.wall / 3600:.2f} h elapsed (sessions that ran side by side, as shards do, counted once), "
                f"{self.summed / 3600:.2f} h summed over sessions")  # fmt: skip


def record_session(file: Path, started: float, seconds: float, ran: bool) -> None:
    """Append one session (``started``: a UTC epoch time) to ``file``."""
    session = {
        "start": time.strftime(START_FORMAT, time.gmtime(started)),
        "seconds": round(seconds, 1),
        "ran": ran,
    }
    with locked(file.parent):
        _write(file, [*(read_json(file)["sessions"] if file.is_file() else []), session])


def merge_timing(into: Path, other: Path) -> None:
    """Add to ``into`` the sessions of ``other`` it lacks. Sessions are compared as (start, seconds, ran) and
    counted, so two shards' identical sessions (same second, same length) stay two."""
    if not other.is_file():
        return
    theirs = read_json(other).get("sessions", [])
    into.parent.mkdir(parents=True, exist_ok=True)
    with locked(into.parent):
        mine = read_json(into)["sessions"] if into.is_file() else []
        missing = Counter(map(_key, theirs)) - Counter(map(_key, mine))
        added = []
        for s in theirs:
            if missing[_key(s)] > 0:
                missing[_key(s)] -= 1
                added.append(s)
        if added or not into.is_file():
            _write(into, [*mine, *added])


def _key(session: Mapping[str, Any]) -> tuple[Any, ...]:
    return session["start"], session["seconds"], session["ran"]


def _epoch(start: str) -> float:
    return float(calendar.timegm(time.strptime(start, START_FORMAT)))


def _write(file: Path, sessions: list[dict[str, Any]]) -> None:
    timing = Timing.of(sessions)
    data = {"sessions": sorted(sessions, key=lambda s: s["start"]), "wall_seconds": timing.wall,
            "summed_seconds": timing.summed}  # fmt: skip
    atomic_write_json(file, normal(data))
