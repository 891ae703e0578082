"""What both readers of a source share: the Table of rows read from one source (loading
reads whole tables through `datasets`, streaming draws rows from sources larger than
memory), the pattern of a hub dataset name, and the UTF-8 check of a raw line. Knows no
other data module, so both can import it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

HUB_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")   # "name" or "owner/name"


@dataclass
class Table:
    """Rows read from one source; row i (0-based) is row i + 1 in messages."""
    source: str                  # the path or hub name, as given
    columns: List[str]
    rows: List[Dict[str, Any]]
    # row index -> why that row could not be read (bad JSON, bad encoding...);
    # rows[index] is then an empty placeholder
    problems: Dict[int, str] = field(default_factory=dict)
    locations: Optional[List[Tuple[str, int]]] = None   # (file, row number) of each row, if not (source, i + 1)

    def location(self, index: int) -> Tuple[str, int]:
        return self.locations[index] if self.locations is not None else (self.source, index + 1)


def utf8_problem(raw: bytes) -> str:
    """'' for UTF-8 bytes, else what is wrong and where (for a row problem message)."""
    try:
        raw.decode("utf-8")
        return ""
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"
