"""Sizes in bytes as people write them ("5GB", "512MiB", "1000"): shard sizes, a memory tier's budget.

Free of torch on purpose: the store factory reads sizes, and client commands import it.
"""

from __future__ import annotations

import re

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Bytes from an int or a string as transformers takes them ("5GB", "500MB", "2GiB", "1000"); `name`
    says in the error what the size was for."""
    value = 0
    if isinstance(size, int):
        value = size
    elif match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE):
        value = int(float(match[1]) * _UNITS[(match[2] or "B").upper()])
    if value < 1:
        raise ValueError(f"{name} is not a positive size: {size!r} (bytes, or e.g. 5GB, 512MiB, 4GiB)")
    return value
