"""How the CLI writes: JSON, tables, times and sizes for people, progress bars, and
`get -o PATH`'s output file.

Human output never shows ``None`` or raw epoch milliseconds: times are a date
and how long ago (or until) it is, sizes are ``2.3 MiB`` (`humanize`), a value
that is missing is ``-``. The ``--json`` forms keep the raw values.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import humanize
from tqdm import tqdm

from blocknode.cli.base import EXIT_USAGE, CliError

MISSING = "-"


def print_json(obj: Any) -> None:
    """Print `obj` as JSON on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"cannot encode {type(o).__name__}")


def when(ms: Any) -> str:
    """A time in ms since the epoch, for humans (`never` for none).

    Total: it comes from a node, so any value (2**63 - 1, negative, not a
    number) gets a line, never an exception.
    """
    if ms is None or ms == 0:
        return "never"
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        return repr(ms)
    try:
        t = datetime.fromtimestamp(ms / 1000, tz=UTC)
        return f"{t.strftime('%Y-%m-%d %H:%M:%S UTC')} ({ago(ms / 1000 - time.time())})"
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms since the epoch (not a calendar date)"


def ago(delta_s: float) -> str:
    """``5 minutes ago`` for a negative `delta_s` (seconds from now), ``in 3 days`` for a
    positive one, ``now`` within a second."""
    if abs(delta_s) < 1:
        return "now"
    text = humanize.naturaldelta(abs(delta_s))
    return f"in {text}" if delta_s > 0 else f"{text} ago"


def duration(seconds: Any) -> str:
    """A duration for people (``3 hours``), `MISSING` for none."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return MISSING
    return humanize.naturaldelta(seconds)


def size(n: Any) -> str:
    """A byte count for people (``2.3 MiB``), `MISSING` for none."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return MISSING
    return humanize.naturalsize(n, binary=True)


def cell(v: Any) -> str:
    """One table cell: `MISSING` for None, ``yes``/``no`` for booleans, floats as %g."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns under upper-case headers (the last column is not padded)."""
    cells = [[h.upper() for h in headers]] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print `table`."""
    for line in table(headers, rows):
        print(line)


def progress(total: float | None, desc: str, *, unit: str = "B", delay: float = 0.0) -> tqdm:
    """A progress bar on stderr when it is a terminal; disabled (silent) otherwise.

    ``unit="B"`` counts bytes (shown as KiB, MiB, ...); use ``update(n)``, or
    `set_progress` for polled progress. `delay`: show it only once that many
    seconds have passed (a quick transfer shows nothing).
    """
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                file=sys.stderr, disable=not sys.stderr.isatty(), leave=True, dynamic_ncols=True,
                delay=delay)


def fraction_progress(desc: str) -> tqdm:
    """A polled bar of a fraction done (scrub, repair, rebalance): `set_progress` it
    with a percentage from 0 to 100."""
    return tqdm(total=100, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=True, dynamic_ncols=True,
                bar_format="{desc}: {percentage:5.1f}%|{bar}| {postfix} [{elapsed}<{remaining}]")


def set_progress(bar: tqdm, n: float, postfix: str = "") -> None:
    """Move a polled bar to `n` (with a status text after it)."""
    bar.n = n
    if postfix:
        bar.set_postfix_str(postfix, refresh=False)
    bar.refresh()


def bar(fraction: float, width: int = 30) -> str:
    """A text progress bar with a percentage."""
    fraction = min(1.0, max(0.0, fraction))
    full = int(fraction * width)
    return "[" + "#" * full + "-" * (width - full) + f"] {fraction * 100:5.1f} %"


class OutputFile:
    """Where `get -o PATH` writes, so that PATH only ever holds complete data.

    PATH a regular file, or absent: the bytes go to a new temporary file next to
    it (created with O_EXCL under a fresh random name, so no file we did not
    create is ever truncated or deleted), which `commit` renames over PATH. A
    symbolic link is written through (its target is replaced, the link stays).
    Anything else (``/dev/null``, a FIFO, a terminal) is written directly. On any
    failure the temporary file is removed and PATH is untouched. Every error
    names PATH, never the temporary name.

        with OutputFile(path) as out:
            for chunk in chunks:
                out.write(chunk)
            out.commit()
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._target = path
        self._tmp: str | None = None
        self._fd = -1

    def __enter__(self) -> OutputFile:
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise self._error(exc) from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise CliError(f"cannot write {self.path}: is a directory", EXIT_USAGE)
        try:
            if st is not None and not stat.S_ISREG(st.st_mode):
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                self._target = os.path.realpath(self.path)
                self._fd, self._tmp = _create_exclusive(self._target)
                if st is not None:
                    os.fchmod(self._fd, stat.S_IMODE(st.st_mode))
        except OSError as exc:
            raise self._error(exc) from None
        return self

    def write(self, data: bytes) -> None:
        """Write all of `data`."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise self._error(exc) from None

    def commit(self) -> None:
        """Make the data visible at PATH (durably, for a regular file)."""
        if self._tmp is None:
            return
        try:
            os.fsync(self._fd)
            try:
                st: os.stat_result | None = os.lstat(self._target)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise CliError(f"cannot write {self.path}: it is no longer a regular file")
            os.replace(self._tmp, self._target)
        except OSError as exc:
            raise self._error(exc) from None
        self._tmp = None

    def __exit__(self, *exc_info: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:  # not committed: remove what we created, nothing else
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None

    def _error(self, exc: OSError) -> CliError:
        return CliError(f"cannot write {self.path}: {exc.strerror or exc}")


def _create_exclusive(target: str) -> tuple[int, str]:
    """A new file next to `target`, made by us (O_EXCL): (fd, its path)."""
    while True:
        tmp = f"{target}.{secrets.token_hex(4)}.part"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
