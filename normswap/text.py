"""Plain text for terminals: lines wrapped at a width, never padded, paths kept whole."""
from __future__ import annotations

import textwrap


def wrapped(text: str, width: int, indent: str, first: str = "") -> list[str]:
    """``text`` wrapped at ``width``: the first line starts with ``first``, the rest with ``indent``."""
    lines = textwrap.wrap(text, width, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False,
                          break_long_words=False)  # a path stays whole, to copy it
    return lines or [first.rstrip()]
