"""What both readers of a source share (loading.py reads whole tables, streaming.py draws
rows from sources larger than memory): the Table of rows read from one source, which files
of a local folder are read, the one reader of a local data file, the UTF-8 check of a raw
line, the pattern of a hub dataset name, and `datasets`, imported for a hub dataset only.
Knows no other data module, so both can import it.

Local files are read without `datasets` (the standard library; Parquet through pyarrow):

- JSON (.json, .jsonl, and .json.gz / .jsonl.gz): a file whose first character is ``[`` is
  one JSON array of rows, read whole; any other is JSON lines, one object a line, blank lines
  skipped, each line kept as its raw bytes until parsed (parse_record), so that a line which
  is not UTF-8, not JSON or not an object is one bad row, not a failed file. A leading
  UTF-8 byte-order mark is skipped.
  Hostile lines are one bad row each, said in anita's words, never an exception of the
  json module's: a line longer than MAX_LINE_BYTES (read no further than that; the
  rest of it skipped), nested deeper than MAX_JSON_DEPTH (found before parsing, so no
  RecursionError), a number longer than Python converts (4,300 digits), or a string
  holding a lone surrogate escape ("\\ud800": no text, and no tokenizer takes it).
- CSV: a field is at most MAX_LINE_BYTES long; the first record is the header; every cell is text ("007" stays "007") and an empty
  cell is None, as `datasets` read CSV with string features. Unlike `datasets` (pandas),
  a cell "NA", "null", "None" or "nan" stays that text, a row with more cells than the
  header is a bad row (pandas silently made its first cell an index), and a header naming
  a column twice is refused. Empty and whitespace-only lines are skipped.
- Parquet: through pyarrow.parquet (imported when a Parquet file is read), in batches.

A folder is read as `datasets` reads one (``load_dataset(folder, split=...)``): its data
files (``DATA_SUFFIXES``) at any depth, skipping hidden files and folders, folders named
``__*`` and `datasets`' metadata files (``config.json``, ``dataset_info.json``...), in
order of path. When their names mark splits, only the asked split's files are read, the
first of these rules that applies deciding: files ``data/{split}-NNNNN-of-NNNNN*``; else
folder names holding a split word (train, training; validation, valid, dev, val; test,
testing, eval, evaluation) as a word of their own (set off by ``-._ `` or digits); else
file names holding one, followed by such a separator. A split's files are then in
`datasets`' order: by the first of its name patterns each matches (the words in the order
above; a name starting with the word before one holding it after a separator), then by
path. Two differences from `datasets`, on purpose: every data file is read whatever its
format (`datasets` reads only the most common format's files and silently leaves the
others), and files whose columns or types differ are read together, as the rows of one
JSON-lines file are (the union of the columns, None where a row lacks one), where
`datasets` refuses the folder.
"""
from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

HUB_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")   # "name" or "owner/name"

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DATA_SUFFIXES = JSON_SUFFIXES + (".parquet", ".csv")
PARQUET_BATCH_ROWS = 256      # rows turned into Python dicts at a time
NOT_DATA = {"config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}
_SEP = "[-._ 0-9]"
# per split, in `datasets`' order: for each of its words, the name patterns a folder (any
# folder on the path) or a file name is tested against; a split's files come in the order
# of the first pattern each matches, then by path
_FOLDER_PATTERNS = ("{w}", "{w}{s}.*", ".*{s}{w}", ".*{s}{w}{s}.*")
_FILE_PATTERNS = ("{w}{s}.*", ".*{s}{w}{s}.*")
_IN_FOLDER_NAME, _IN_FILE_NAME = (
    {split: [re.compile(p.format(w=word, s=_SEP)) for word in words for p in patterns]
     for split, words in SPLIT_WORDS.items()}
    for patterns in (_FOLDER_PATTERNS, _FILE_PATTERNS))
_SHARDED = re.compile(r"data/(?P<split>[^/]+)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*")
_BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 32 * 2**20    # one JSON line (one row), or one CSV field
MAX_JSON_DEPTH = 100           # arrays and objects inside each other in one row
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_NESTING = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))


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


class Unreadable(str):
    """A record of a file that is known, as it is read, not to be a row: what is wrong."""


def utf8_problem(raw: bytes) -> str:
    """'' for UTF-8 bytes, else what is wrong and where (for a row problem message)."""
    try:
        raw.decode("utf-8")
        return ""
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"


def hub_datasets(name: str):
    """The `datasets` module, quiet, to read the hub dataset ``name``; a one-line
    ValueError when it is not installed (only a hub dataset needs it)."""
    try:
        import datasets
    except ImportError as e:
        if e.name not in (None, "datasets"):        # installed, but something it needs is not
            raise
        raise ValueError(f"{name}: not a local file or folder; reading a hub dataset needs the "
                         f"'datasets' package (pip install datasets, or pip install -e \".[hub]\")"
                         ) from None
    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: `datasets` logs a load it cannot do at ERROR level and then
    # raises; the caller says what failed in one line, so the log would only come before it
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


# ------------------------------------------------------------------ which files
def shard_files(folder: str, split: str = "train") -> List[str]:
    """The data files of ``folder`` to read, in order (the rule: module docstring)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        files += [os.path.join(root, name) for name in names
                  if not name.startswith(".") and name not in NOT_DATA
                  and name.lower().endswith(DATA_SUFFIXES)]
    if not files:
        raise ValueError(f"{folder}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
    files.sort()
    relative = {os.path.relpath(file, folder).replace(os.sep, "/"): file for file in files}
    splits = _named_splits(list(relative))
    if splits is None:
        return files
    if split not in splits:
        raise ValueError(f"{folder}: no {split!r} files: the names of its files mark the splits "
                         f"{sorted(splits)} (as `datasets` reads a folder)")
    return [relative[path] for path in splits[split]]


def _named_splits(paths: List[str]) -> Optional[Dict[str, List[str]]]:
    """split -> the paths (relative, '/'-separated, sorted) its names put in it, in
    order; None when no name marks a split (every file is then read)."""
    sharded: Dict[str, List[str]] = {}
    for path in paths:
        match = _SHARDED.fullmatch(path)
        if match:
            sharded.setdefault(match["split"], []).append(path)
    if sharded:
        return sharded
    for patterns, parts in ((_IN_FOLDER_NAME, lambda p: p.split("/")[:-1]),
                            (_IN_FILE_NAME, lambda p: p.split("/")[-1:])):
        splits = {split: list(dict.fromkeys(p for pattern in ordered for p in paths
                                            if any(pattern.fullmatch(part) for part in parts(p))))
                  for split, ordered in patterns.items()}
        splits = {split: found for split, found in splits.items() if found}
        if splits:
            return splits
    return None


# ------------------------------------------------------------------ one file
def file_rows(file: str) -> Iterator[Tuple[int, Any]]:
    """Every record of one local data file, in order, as (number, raw): ``number`` is
    the line number for JSON lines, else the record's 1-based index (CSV: the header not
    counted); ``raw`` is a row dict, a JSON value from an array, the raw bytes of a
    JSON line, or an Unreadable. parse_record turns raw into the row (or a problem).
    A file that cannot be read at all raises a ValueError naming it."""
    lower = file.lower()
    if lower.endswith(".parquet"):
        yield from _parquet_rows(file)
    elif lower.endswith(".csv"):
        yield from _csv_rows(file)
    elif lower.endswith(JSON_SUFFIXES):
        try:
            yield from _json_rows(file, gzip.open if lower.endswith(".gz") else open)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:   # a .gz that is not gzip, or cut short
            raise ValueError(f"{file}: not a readable gzip file ({type(e).__name__}: {e})") from None
    else:
        raise ValueError(f"{file}: unsupported file type; expected one of {list(DATA_SUFFIXES)}")


def parse_record(raw: Any) -> Dict[str, Any]:
    """The row a record from file_rows (or a hub dataset) holds; a ValueError says why
    it is not one (not UTF-8, not JSON, too deep, not an object, a lone surrogate,
    Unreadable): a row problem."""
    if isinstance(raw, Unreadable):
        raise ValueError(str(raw))
    if isinstance(raw, bytes):
        problem = utf8_problem(raw)
        if problem:
            raise ValueError(problem)
        raw = _loads(raw)
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    return raw


def _loads(raw: bytes, surrogates: bool = True, array: bool = False) -> Any:
    """json.loads of UTF-8 bytes, each way it can fail a ValueError in anita's words
    (``surrogates``: a string holding a lone surrogate is one of them; ``array``: the
    text is an array of rows, one level more)."""
    limit = MAX_JSON_DEPTH + array
    depth = json_depth(raw) if raw.count(b"[") + raw.count(b"{") > limit else 0
    if depth > limit:
        raise ValueError(f"nested {depth - array:,} levels deep (a row may nest at most "
                         f"{MAX_JSON_DEPTH})")
    try:
        value = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:      # (a line number for a file holding an array)
        raise ValueError(f"{f'line {e.lineno}: ' if array else ''}not valid JSON ({e.msg})") from None
    except RecursionError:     # not reached below MAX_JSON_DEPTH; kept as the last guard
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as e:    # an integer past Python's conversion limit
        digits = re.search(r"value has (\d+) digits", str(e))
        raise ValueError(f"a number of {int(digits.group(1)):,} digits (at most 4,300 are read)"
                         if digits else f"not valid JSON ({e})") from None
    if surrogates and _SURROGATE_ESCAPE.search(raw):
        where = lone_surrogate(value)
        if where:
            raise ValueError(f"{where} holds a lone surrogate escape (half of a UTF-16 pair, "
                             "no text: was the text cut between the halves of a character?)")
    return value


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON text (brackets inside strings not counted)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(_NESTING, _NOT_BRACKETS)
    return max(itertools.accumulate(b - 1 for b in brackets), default=0)


def lone_surrogate(value: Any, where: str = "the row") -> str:
    """Where in a parsed JSON value a string (or key) holds a surrogate code point, or ''."""
    if isinstance(value, str):
        return where if re.search("[\ud800-\udfff]", value) else ""
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(key, f"a key of {where}") or lone_surrogate(
                item, f"field {key!r}" if where == "the row" else f"{where}[{key!r}]")
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate(item, f"{where}[{index}]")
            if found:
                return found
    return ""


def _json_rows(file: str, opener) -> Iterator[Tuple[int, Any]]:
    # read as bytes: a line that is not UTF-8 is then one bad row, not a failed file
    with opener(file, "rb") as f:
        start = 3 if f.read(3) == _BOM else 0
        f.seek(start)
        while True:
            chunk = f.read(4096)
            if not chunk or chunk.strip():
                break
        f.seek(start)
        if chunk.strip()[:1] == b"[":   # a JSON array cannot be streamed line by line: read it whole
            data = f.read()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                number = data.count(b"\n", 0, e.start) + 1
                line = data[data.rfind(b"\n", 0, e.start) + 1:].split(b"\n", 1)[0]
                raise ValueError(f"{file}: line {number}: {utf8_problem(line)}") from None
            try:                 # the array is one more level than its rows
                rows = _loads(data, surrogates=False, array=True)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None    # the whole array: no row to name
            surrogates = bool(_SURROGATE_ESCAPE.search(data))
            del data
            for number, row in enumerate(rows if isinstance(rows, list) else [rows], start=1):
                where = lone_surrogate(row) if surrogates else ""
                yield number, (Unreadable(f"{where} holds a lone surrogate escape (half of a UTF-16 "
                                          "pair, no text)") if where else row)
            return
        number = 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):      # the rest of it, unread
                    line = f.readline(1 << 20)
                yield number, Unreadable(f"a line longer than {MAX_LINE_BYTES:,} bytes (one JSON "
                                         "line is one row: is this a JSON-lines file?)")
            elif line.strip():
                yield number, line


def _csv_rows(file: str) -> Iterator[Tuple[int, Any]]:
    # a long text is one cell: the csv module's 128 KiB limit on a field, raised to a row's
    csv.field_size_limit(MAX_LINE_BYTES)
    with open(file, encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        try:
            header = next((cells for cells in reader if cells), None)
            if header is None:
                raise ValueError(f"{file}: empty CSV file (no header row)")
            twice = [name for name in dict.fromkeys(header) if header.count(name) > 1]
            if twice:
                raise ValueError(f"{file}: line {reader.line_num}: the header names column "
                                 f"{twice[0]!r} twice")
            number = 0
            for cells in reader:
                if not cells or (len(cells) == 1 and not cells[0].strip()):   # a blank line
                    continue
                number += 1
                if len(cells) > len(header):
                    yield number, Unreadable(f"{len(cells)} cells, but the header names "
                                             f"{len(header)} columns")
                    continue
                # an empty cell (or one the row does not reach) is a missing value
                yield number, {name: cell or None for name, cell in
                               itertools.zip_longest(header, cells)}
        except UnicodeDecodeError:
            raise ValueError(_first_non_utf8_line(file)) from None
        except csv.Error as e:
            raise ValueError(f"{file}: line {reader.line_num}: not valid CSV ({e})") from None


def _first_non_utf8_line(file: str) -> str:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            problem = utf8_problem(raw)
            if problem:
                return f"{file}: line {number}: {problem}"
    return f"{file}: not UTF-8 text"


def _parquet_rows(file: str) -> Iterator[Tuple[int, Any]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{file}: reading Parquet needs the 'pyarrow' package "
                         f"(pip install pyarrow)") from None
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError, pyarrow.ArrowException) as e:   # ArrowInvalid is a ValueError
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # Arrow's: lines
        raise ValueError(f"{file}: cannot be read as parquet: {type(e).__name__}: {reason}") from None
