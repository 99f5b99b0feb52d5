"""How the CLI prints: JSON, times, progress bars."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def print_json(obj: Any) -> None:
    """Print `obj` as JSON on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"cannot encode {type(o).__name__}")


def when(ms: int | None) -> str:
    """A time in ms since the epoch, for humans (`never` for none)."""
    if not ms:
        return "never"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def bar(fraction: float, width: int = 30) -> str:
    """A text progress bar with a percentage."""
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "[" + "#" * full + "-" * (width - full) + f"] {fraction * 100:5.1f} %"
