"""Memory sizes as people write them ('512MiB', '2GB', '1048576'), for the CLI and the Serve config alike."""

from __future__ import annotations

import argparse
import re

MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
                "g": 2**30, "gb": 10**9, "gib": 2**30}


class InvalidMemorySize(ValueError, argparse.ArgumentTypeError):
    """A ValueError for callers, and the message argparse prints as is when it parses an option."""


def parse_bytes(text: str) -> int:
    """'512MiB', '2GB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in MEMORY_UNITS:
        raise InvalidMemorySize(f"invalid memory size {text!r} (examples: 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
