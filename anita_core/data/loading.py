"""Reading rows from local JSON / JSONL / Parquet / CSV files (or a folder of
them, or a hub dataset name when online) through `datasets`."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

from anita_core.data.rows import CHECKS, SHAPES, BadRowError, RowProblem, detect_shape
from anita_core.data.stats import DataStats

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
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


def _quiet_datasets():
    import datasets
    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: its JSON builder logs the parser's failure (with its own,
    # 0-based row count) before raising; anita reports the file and row itself
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def utf8_problem(raw: bytes) -> str:
    """'' for UTF-8 bytes, else what is wrong and where (for a row problem message)."""
    try:
        raw.decode("utf-8")
        return ""
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"


def _read_json_lines(path: str, max_rows: Optional[int]) -> Table:
    """A JSON-lines file read line by line, for when `datasets` cannot load it: each
    blank line is ignored, each other line is one row, and a line that is not UTF-8,
    not JSON or not an object becomes a row problem (reported, or skipped with
    skip_bad_rows) instead of failing the whole file."""
    rows: List[Dict[str, Any]] = []
    problems: Dict[int, str] = {}
    columns: Dict[str, None] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if not raw.strip():
                continue
            problem = utf8_problem(raw)
            value = None
            if not problem:
                try:
                    value = json.loads(raw.decode("utf-8"))
                except json.JSONDecodeError as e:
                    problem = f"not valid JSON ({e.msg})"
            if not problem and not isinstance(value, dict):
                problem = f"expected a JSON object, got {type(value).__name__}"
            if problem:
                where = "" if number == len(rows) + 1 else f"line {number}: "   # blank lines above
                problems[len(rows)] = where + problem
                rows.append({})
            else:
                columns.update(dict.fromkeys(value))
                rows.append(value)
    names = list(columns)
    rows = [row if i in problems else {c: row.get(c) for c in names} for i, row in enumerate(rows)]
    return Table(source=path, columns=names, rows=rows, problems=problems)


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _check_not_empty(path: str) -> None:
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip() and not f.read(1):
            raise ValueError(f"{path}: empty file (no rows)")


def _check_utf8(path: str) -> None:
    """For whole-file formats (a JSON array, CSV): the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            problem = utf8_problem(raw)
            if problem:
                raise ValueError(f"{path}: line {number}: {problem}")


def read_table(source: str, *, split: str = "train", max_rows: Optional[int] = None,
               cache_dir: Optional[str] = None) -> Table:
    """All rows of ``source`` (the first ``max_rows`` when given).

    ``source`` is a .json/.jsonl/.parquet/.csv file, a folder `datasets` can
    load, or a hub dataset name (needs network)."""
    datasets = _quiet_datasets()
    source = os.path.expanduser(os.fspath(source))
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in BUILDERS:
            raise ValueError(f"{source}: unsupported file type {ext!r}; expected one of "
                             f"{sorted(BUILDERS)}")
        _check_not_empty(source)
        if ext == ".csv":
            _check_utf8(source)
        name, kwargs = BUILDERS[ext], {"data_files": source, "split": "train"}
        if ext == ".csv":
            # CSV cells are text: without this, a column of digits ("17") would
            # be inferred as numbers and then rejected as the wrong type
            kwargs["features"] = _all_text_features(datasets, source)
    elif ext in BUILDERS:
        raise FileNotFoundError(f"{source}: no such file")
    elif not os.path.isdir(source) and not HUB_NAME.match(source):
        # a path that is not there; asking the hub would only retry for half a minute
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub dataset name)")
    else:
        name, kwargs = source, {"split": split}
    try:
        dataset = datasets.load_dataset(name, cache_dir=cache_dir, **kwargs)
        if max_rows is not None and max_rows < len(dataset):
            dataset = dataset.select(range(max_rows))
        # Arrow does not check UTF-8 on load: a bad byte shows here, in to_list
        return Table(source=source, columns=list(dataset.column_names), rows=dataset.to_list())
    except Exception as e:             # datasets wraps parser errors in its own types
        if os.path.isfile(source) and ext in (".json", ".jsonl"):
            if not _is_json_array(source):
                return _read_json_lines(source, max_rows)
            _check_utf8(source)
        raise ValueError(_load_failure(source, ext, e)) from e


def _all_text_features(datasets, path: str):
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"{path}: empty CSV file (no header row)")
    return datasets.Features({column: datasets.Value("string") for column in header})


def _load_failure(source: str, ext: str, error: Exception) -> str:
    reason = f"{type(error).__name__}: {error}" if str(error).strip() else type(error).__name__
    if os.path.isfile(source) and ext == ".json":
        with open(source, encoding="utf-8") as f:
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                return f"{source}: line {e.lineno}: not valid JSON ({e.msg})"
    if os.path.exists(source):
        return f"{source}: cannot be read as {BUILDERS.get(ext, 'a dataset')}: {reason}"
    return (f"{source}: not a local file or folder, and loading it as a hub dataset failed "
            f"(offline?): {reason}")


def read_rows(sources: Union[str, Sequence[str]], *, stats: DataStats, shape: str = "auto",
              allowed_shapes: Collection[str] = SHAPES, skip_bad_rows: bool = False,
              max_samples: Optional[int] = None, exclude_sources: Collection[str] = (),
              split: str = "train", cache_dir: Optional[str] = None, seed: int = 0,
              progress: bool = False, locations: Optional[List[Tuple[str, int]]] = None,
              ) -> List[Tuple[str, Dict[str, Any]]]:
    """Validated rows from one or more sources, as (shape, normalized row).

    ``max_samples`` draws that many rows uniformly at random (``seed``) from all
    sources together, streamed in O(max_samples) memory (streaming.py). Rows whose
    ``source`` column is in ``exclude_sources`` are dropped before validation.
    A malformed row raises BadRowError (a ValueError naming the source and the
    row number), or with ``skip_bad_rows`` is skipped and counted. A
    ``locations`` list receives each returned row's (file or source, row number)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given")
    if shape != "auto" and shape not in allowed_shapes:
        raise ValueError(f"row shape {shape!r} is not usable here; expected 'auto' or one of "
                         f"{sorted(allowed_shapes)}")
    exclude = set(exclude_sources)
    out: List[Tuple[str, Dict[str, Any]]] = []
    if max_samples is not None:
        from anita_core.data.streaming import sampled_tables
        tables = sampled_tables(sources, max_samples, seed, split=split, cache_dir=cache_dir,
                                progress=progress)
    else:
        tables = (read_table(source, split=split, cache_dir=cache_dir) for source in sources)
    for table in tables:
        row_shape = shape if shape != "auto" else detect_shape(table.columns, table.source)
        if row_shape not in allowed_shapes:
            raise ValueError(f"{table.source}: holds {row_shape} rows; expected one of "
                             f"{sorted(allowed_shapes)}")
        check = CHECKS[row_shape]
        for index, row in enumerate(table.rows):
            stats.rows_read += 1
            row_source = row.get("source") if isinstance(row, dict) else None
            if exclude and isinstance(row_source, str) and row_source in exclude:
                stats.filtered_by_source += 1
                continue
            try:
                if index in table.problems:
                    raise RowProblem(table.problems[index])
                if isinstance(row, RowProblem):       # a drawn line that is not a JSON object
                    raise row
                out.append((row_shape, check(row)))
                if locations is not None:
                    locations.append(table.location(index))
            except RowProblem as problem:
                error = BadRowError(*table.location(index), str(problem))
                if not skip_bad_rows:
                    raise error from None
                stats.note_bad_row(str(error))
    return out
