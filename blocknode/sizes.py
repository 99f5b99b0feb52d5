"""Byte sizes written for people: ``"256M"``, ``"1MiB"``, ``"1T"``, as Garage's config takes them.

Garage reads its size fields (``block_size``, ``lmdb_map_size``,
``block_ram_buffer_max``, ...) with the ``bytesize`` crate; this module reads
the same forms, so a value copied from a Garage config means the same here:

- a number of bytes: ``1048576`` (a TOML integer) or ``"1048576"``;
- a number (decimals allowed) and a unit, case-insensitive, spaces allowed
  between them: ``K``/``KB`` = 1000, ``M``/``MB`` = 1000², ``G``/``GB``,
  ``T``/``TB``, ``P``/``PB`` (powers of 1000, as in Garage), and ``KiB``/``Ki``
  = 1024, ``MiB``/``Mi`` = 1024², ``GiB``, ``TiB``, ``PiB`` (powers of 1024);
  ``B`` = bytes. So ``"1M"`` is 1,000,000 bytes and ``"1MiB"`` 1,048,576.

A fractional result is rounded down to whole bytes (``"1.5K"`` = 1500).
"""

from __future__ import annotations

import re

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "i"] = _UNITS[_p + "ib"] = 1024**_i

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")

# How an error message describes the string forms.
SIZE_FORMS = '"256MiB" or "1T" (K, M, G, T: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)'


def parse_size(text: str) -> int | None:
    """The number of bytes `text` names, or None when it is not a size."""
    m = _SIZE.fullmatch(text)
    if m is None:
        return None
    mult = _UNITS.get(m[2].lower())
    if mult is None:
        return None
    number = m[1]
    if "." not in number:
        return int(number) * mult
    whole, _, frac = number.partition(".")
    # exact decimal arithmetic: "1.1T" is 1,100,000,000,000, not a float's neighbour
    scale = 10 ** len(frac)
    return (int(whole or "0") * scale + int(frac or "0")) * mult // scale


def format_size(n: int) -> str:
    """`n` bytes in the largest binary unit that divides it exactly: ``"1MiB"``,
    ``"16KiB"``; otherwise plain bytes (parse_size reads either back)."""
    for unit, mult in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2),
                       ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


__all__ = ["SIZE_FORMS", "format_size", "parse_size"]
