"""Reading rows from local JSON / JSONL / Parquet / CSV files (or a folder of
them, or a hub dataset name when online) through `datasets`."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
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
    locations: Optional[List[Tuple[str, int]]] = None   # (file, row number) of each row, if not (source, i + 1)

    def location(self, index: int) -> Tuple[str, int]:
        return self.locations[index] if self.locations is not None else (self.source, index + 1)


def _quiet_datasets():
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _first_bad_json_line(path: str) -> Optional[str]:
    """The location and reason of the first line that is not a JSON object, for
    a JSON-lines file whose loading failed (the Arrow error does not say)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None                     # a valid single JSON document: not JSON lines
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):          # a JSON array: its own error has the line
            return f"line {whole.lineno}: not valid JSON ({whole.msg})"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}: not valid JSON ({e.msg})"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object, got {type(value).__name__}"
    return None


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
    except Exception as e:             # datasets wraps parser errors in its own types
        raise ValueError(_load_failure(source, ext, e)) from e
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.select(range(max_rows))
    return Table(source=source, columns=list(dataset.column_names), rows=dataset.to_list())


def _all_text_features(datasets, path: str):
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"{path}: empty CSV file (no header row)")
    return datasets.Features({column: datasets.Value("string") for column in header})


def _load_failure(source: str, ext: str, error: Exception) -> str:
    if os.path.isfile(source) and ext in (".json", ".jsonl"):
        where = _first_bad_json_line(source)
        if where:
            return f"{source}: {where}"
    if os.path.exists(source):
        return f"{source}: cannot be read as {BUILDERS.get(ext, 'a dataset')}: {error}"
    return (f"{source}: not a local file or folder, and loading it as a hub dataset failed "
            f"(offline?): {type(error).__name__}: {error}")


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
