"""Shared report helpers of the bench commands: the CPU line and RESULTS.md sections."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_model", "write_section"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the RESULTS.md section that starts at `heading`, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(heading)
    block = f"{heading}\n\n{body}"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + block + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    path.write_text(text)
