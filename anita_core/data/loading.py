"""Reading rows from local JSON / JSONL / Parquet / CSV files or a folder of them
(table.py's readers, without `datasets`), or from a hub dataset name when online
(through `datasets`, the one source that needs it), and validating them."""
from __future__ import annotations

import itertools
import os
from typing import Any, Collection, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from anita_core.data.rows import CHECKS, SHAPES, BadRowError, RowProblem, detect_shape
from anita_core.data.stats import DataStats
from anita_core.data.table import (DATA_SUFFIXES, HUB_NAME, Table, file_rows, hub_datasets,
                                   parse_record, shard_files)


def read_table(source: str, *, split: str = "train", max_rows: Optional[int] = None,
               cache_dir: Optional[str] = None) -> Table:
    """All rows of ``source`` (the first ``max_rows`` when given).

    ``source`` is a data file (``table.DATA_SUFFIXES``), a folder of them (which
    files, and in which order: table.shard_files, ``split`` choosing among files
    whose names mark splits), or a hub dataset name (needs `datasets` and network).
    A row that cannot be read (a JSON line that is not UTF-8, not JSON or not an
    object; a CSV row with too many cells) is in ``problems``; a file that cannot
    be read at all raises a ValueError naming it (and the line, where there is one)."""
    source = os.path.expanduser(os.fspath(source))
    if os.path.isfile(source):
        if not source.lower().endswith(DATA_SUFFIXES):
            raise ValueError(f"{source}: unsupported file type {os.path.splitext(source)[1].lower()!r}; "
                             f"expected one of {list(DATA_SUFFIXES)}")
        _check_not_empty(source)
        return _local_table(source, [source], max_rows)
    if os.path.isdir(source):
        return _local_table(source, shard_files(source, split), max_rows)
    if source.lower().endswith(DATA_SUFFIXES):
        raise FileNotFoundError(f"{source}: no such file")
    if not HUB_NAME.match(source):
        # a path that is not there; asking the hub would only retry for half a minute
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub dataset name)")
    return _hub_table(source, split, max_rows, cache_dir)


def _local_table(source: str, files: List[str], max_rows: Optional[int]) -> Table:
    """The rows of local ``files``, numbered per file: row k of a file is its k-th
    record (for JSON lines, blank lines not counted: a problem row whose line number
    differs says its line too). The columns: every key of any row, in order of first
    appearance; a row lacking one has None there (as `datasets` reads a JSON-lines file)."""
    def numbered() -> Iterator[Tuple[str, int, int, Any]]:
        for file in files:
            for row_number, (number, raw) in enumerate(file_rows(file), start=1):
                yield file, row_number, number, raw

    rows: List[Dict[str, Any]] = []
    problems: Dict[int, str] = {}
    locations: List[Tuple[str, int]] = []
    columns: Dict[str, None] = {}
    for file, row_number, number, raw in itertools.islice(numbered(), max_rows):
        try:
            row = parse_record(raw)
            columns.update(dict.fromkeys(row))
        except ValueError as e:
            where = f"line {number}: " if isinstance(raw, bytes) and number != row_number else ""
            problems[len(rows)] = where + str(e)
            row = {}
        rows.append(row)
        locations.append((file, row_number))
    names = list(columns)
    rows = [row if i in problems else {c: row.get(c) for c in names} for i, row in enumerate(rows)]
    return Table(source=source, columns=names, rows=rows, problems=problems,
                 locations=None if files == [source] else locations)


def _hub_table(name: str, split: str, max_rows: Optional[int], cache_dir: Optional[str]) -> Table:
    datasets = hub_datasets(name)
    try:
        dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        if max_rows is not None and max_rows < len(dataset):
            dataset = dataset.select(range(max_rows))
        return Table(source=name, columns=list(dataset.column_names), rows=dataset.to_list())
    except Exception as e:             # offline, unknown dataset, ...: datasets' own error types
        reason = f"{type(e).__name__}: {e}" if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: not a local file or folder, and loading it as a hub dataset "
                         f"failed (offline?): {reason}") from e


def _unreadable_file(table: Table, skip_bad_rows: bool) -> Optional[BadRowError]:
    """For a file no row of which could be read (all bad JSON or bad encoding: not
    a JSON-lines file at all), its first bad row, to refuse the file with."""
    if table.columns or not table.rows:
        return None
    for index, row in enumerate(table.rows):
        problem = table.problems.get(index) or (str(row) if isinstance(row, RowProblem) else "")
        if problem:
            if skip_bad_rows:
                problem += " (no row of this file is readable: --skip-bad-rows skips rows, not files)"
            return BadRowError(*table.location(index), problem)
    return None


def _check_not_empty(path: str) -> None:
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip() and not f.read(1):
            raise ValueError(f"{path}: empty file (no rows)")


def read_rows(sources: Union[str, Sequence[str]], *, stats: DataStats, shape: str = "auto",
              allowed_shapes: Collection[str] = SHAPES, skip_bad_rows: bool = False,
              max_samples: Optional[int] = None, exclude_sources: Collection[str] = (),
              split: str = "train", cache_dir: Optional[str] = None, seed: int = 0,
              progress: bool = False, locations: Optional[List[Tuple[str, int]]] = None,
              ) -> List[Tuple[str, Dict[str, Any]]]:
    """Validated rows from one or more sources, as (shape, normalized row): the read
    stage (read_tables) then the shape stage (shape_rows); see each for the options."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given")
    if shape != "auto" and shape not in allowed_shapes:
        raise ValueError(f"row shape {shape!r} is not usable here; expected 'auto' or one of "
                         f"{sorted(allowed_shapes)}")
    tables = read_tables(sources, max_samples=max_samples, split=split, cache_dir=cache_dir,
                         seed=seed, progress=progress)
    return shape_rows(tables, stats=stats, shape=shape, allowed_shapes=allowed_shapes,
                      skip_bad_rows=skip_bad_rows, exclude_sources=exclude_sources,
                      locations=locations)


def read_tables(sources: Union[str, Sequence[str]], *, max_samples: Optional[int] = None,
                split: str = "train", cache_dir: Optional[str] = None, seed: int = 0,
                progress: bool = False) -> Iterator[Table]:
    """The read stage: each source's table in turn (lazily), or with ``max_samples``
    that many rows drawn uniformly at random (``seed``) from all sources together,
    streamed in O(max_samples) memory (streaming.py)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given")
    if max_samples is not None:
        from anita_core.data.streaming import sampled_tables
        return sampled_tables(sources, max_samples, seed, split=split, cache_dir=cache_dir,
                              progress=progress)
    return (read_table(source, split=split, cache_dir=cache_dir) for source in sources)


def shape_rows(tables: Iterable[Table], *, stats: DataStats, shape: str = "auto",
               allowed_shapes: Collection[str] = SHAPES, skip_bad_rows: bool = False,
               exclude_sources: Collection[str] = (),
               locations: Optional[List[Tuple[str, int]]] = None,
               ) -> List[Tuple[str, Dict[str, Any]]]:
    """The shape stage: the read tables' rows validated, as (shape, normalized row).
    Rows whose ``source`` column is in ``exclude_sources`` are dropped before
    validation. A malformed row raises BadRowError (a ValueError naming the source
    and the row number), or with ``skip_bad_rows`` is skipped and counted. A
    ``locations`` list receives each returned row's (file or source, row number)."""
    exclude = set(exclude_sources)
    out: List[Tuple[str, Dict[str, Any]]] = []
    for table in tables:
        unreadable = _unreadable_file(table, skip_bad_rows)
        if unreadable is not None:
            raise unreadable
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
