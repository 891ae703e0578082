"""Sources larger than memory: rows streamed one at a time from a local file or
folder of shards (.jsonl / .json / .parquet / .csv, and .jsonl.gz / .json.gz)
or from a hub dataset (`datasets` streaming, when online), and a seeded,
uniform draw of N of them in O(N) memory (reservoir sampling).

The draw: every record of every source, in order (sources as given; a folder's
shards sorted by path), is one candidate; ``reservoir_sample`` keeps N of them,
each N-subset equally likely (Li's "Algorithm L": the gaps between
replacements are drawn directly, so the random generator is called about
N log(total / N) times, not once per record). The same seed over the same
corpus draws the same rows. A JSON-lines record is kept as its raw line and
parsed only when drawn, so most of a large corpus is never parsed; a line that
is not JSON is then reported like any malformed row (file and line).
"""
from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import os
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, TypeVar

from anita_core.data.rows import RowProblem
from anita_core.data.table import HUB_NAME, Table, utf8_problem

T = TypeVar("T")

SHARD_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")
PARQUET_BATCH_ROWS = 256      # rows turned into Python dicts at a time
PROGRESS_EVERY = 4096          # records between progress-bar updates


@dataclass
class Record:
    """One candidate row: where it is, and the row (a dict, or the raw JSON line
    until ``parsed``)."""
    source: str        # the source as given (file, folder or hub name)
    file: str          # the file it is in (the hub name for a hub dataset)
    number: int        # 1-based record number in that file (JSON lines: the line number)
    raw: Any           # a dict, or the raw bytes of a JSON line

    def parsed(self) -> Any:
        """The row; a raw JSON line is parsed now (a ValueError says why it is not
        JSON; ``file`` and ``number`` say where)."""
        if not isinstance(self.raw, bytes):
            return self.raw
        problem = utf8_problem(self.raw)
        if problem:
            raise ValueError(problem)
        try:
            return json.loads(self.raw.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from None


def reservoir_sample(items: Iterable[T], n: int, seed: int) -> List[T]:
    """``n`` items drawn uniformly without replacement from ``items`` (all of
    them when there are fewer), in O(n) memory, in no particular order;
    reproducible from ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of rows to draw must be a positive integer, got {n!r}")
    rng = random.Random(seed)
    iterator = iter(items)
    reservoir = list(itertools.islice(iterator, n))
    if len(reservoir) < n:
        return reservoir
    # log of W, the largest of n uniform keys among the kept items: log space
    # keeps 1 - W exact when W is within 1e-16 of 1 (n large, small uniforms)
    log_w = math.log(_uniform(rng)) / n
    while True:
        gap = math.floor(math.log(_uniform(rng)) / math.log(-math.expm1(log_w)))
        item = next(itertools.islice(iterator, gap, None), _END)
        if item is _END:
            return reservoir
        reservoir[rng.randrange(n)] = item
        log_w += math.log(_uniform(rng)) / n


_END = object()


def _uniform(rng: random.Random) -> float:
    """A uniform draw in (0, 1) (random() may return 0.0)."""
    while True:
        u = rng.random()
        if u > 0.0:
            return u


def shard_files(folder: str) -> List[str]:
    """The data files under ``folder`` (recursively, hidden ones skipped), sorted."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, name) for name in names
                  if not name.startswith(".") and name.lower().endswith(SHARD_SUFFIXES)]
    return sorted(files)


def records(source: str, *, split: str = "train", cache_dir: Optional[str] = None,
            is_hub_name: Callable[[str], bool] = lambda s: False) -> Iterator[Record]:
    """Every record of ``source`` (a data file, a folder of shards, or a hub
    dataset name), streamed."""
    path = os.path.expanduser(os.fspath(source))
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = shard_files(path)
        if not files:
            raise ValueError(f"{source}: no data files ({', '.join(SHARD_SUFFIXES)}) in this folder")
    elif is_hub_name(path):
        yield from _hub_records(source, split, cache_dir)
        return
    else:
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub dataset name)")
    for file in files:
        try:
            for number, raw in _file_rows(file):
                yield Record(source, file, number, raw)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:    # a .gz that is not gzip, or cut short
            raise ValueError(f"{file}: not a readable gzip file ({type(e).__name__}: {e})") from None


def _file_rows(file: str) -> Iterator[tuple]:
    lower = file.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq
        number = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif lower.endswith(".csv"):
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ValueError(f"{file}: empty CSV file (no header row)")
            # an empty cell is a missing value, as `datasets` reads it
            for number, row in enumerate(reader, start=1):
                yield number, {k: (v if v != "" else None) for k, v in row.items()}
    elif lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        # read as bytes: a line that is not UTF-8 is then one bad row (Record.parsed
        # says so, with its line), not an error that stops the whole file
        opener = gzip.open if lower.endswith(".gz") else open
        with opener(file, "rb") as f:
            first = _first_char(f)
            if first == b"[":     # a JSON array cannot be streamed line by line: read this file whole
                try:
                    rows = json.loads(f.read().decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{file}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None
                for number, row in enumerate(rows, start=1):
                    yield number, row
                return
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line
    else:
        raise ValueError(f"{file}: unsupported file type; expected one of {list(SHARD_SUFFIXES)}")


def _first_char(f) -> bytes:
    """The first non-blank byte of a file opened in binary, which is then rewound."""
    while True:
        chunk = f.read(4096)
        if not chunk or chunk.strip():
            f.seek(0)
            return chunk.strip()[:1]


def _hub_records(name: str, split: str, cache_dir: Optional[str]) -> Iterator[Record]:
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True, cache_dir=cache_dir)
        for number, row in enumerate(dataset, start=1):
            yield Record(name, name, number, row)
    except Exception as e:          # offline, unknown dataset, ...: datasets' own error types
        raise ValueError(f"{name}: not a local file or folder, and streaming it as a hub dataset "
                         f"failed (offline?): {type(e).__name__}: {e}") from e


def sample_records(sources: Sequence[str], n: int, seed: int, *, split: str = "train",
                   cache_dir: Optional[str] = None, is_hub_name: Callable[[str], bool] = lambda s: False,
                   progress: bool = False) -> List[Record]:
    """``n`` records drawn uniformly from all ``sources`` together (all of them
    when there are fewer), in corpus order; a progress bar counts records read."""
    from tqdm.auto import tqdm

    def candidates() -> Iterator[Record]:
        for source in sources:
            yield from records(source, split=split, cache_dir=cache_dir, is_hub_name=is_hub_name)

    with tqdm(desc=f"drawing {n} rows", unit=" rows", disable=not progress, leave=False) as bar:
        def numbered() -> Iterator[tuple]:
            for index, record in enumerate(candidates()):
                if (index + 1) % PROGRESS_EVERY == 0:
                    bar.update(PROGRESS_EVERY)
                yield index, record
        drawn = reservoir_sample(numbered(), n, seed)
    return [record for _, record in sorted(drawn, key=lambda pair: pair[0])]


def sampled_tables(sources: Sequence[str], n: int, seed: int, *, split: str = "train",
                   cache_dir: Optional[str] = None, progress: bool = False) -> list:
    """The ``n`` drawn rows as one table.Table per source that has any (the
    columns: every key its drawn rows hold), each row located by file and
    record number. A drawn line that is not a JSON object is put in as the
    RowProblem saying so, for read_rows to raise or skip like any bad row."""
    drawn = sample_records(sources, n, seed, split=split, cache_dir=cache_dir,
                           is_hub_name=lambda s: bool(HUB_NAME.match(s)), progress=progress)
    tables = []
    for source in dict.fromkeys(record.source for record in drawn):
        rows, locations, columns = [], [], {}
        for record in (r for r in drawn if r.source == source):
            try:
                row = record.parsed()
                if not isinstance(row, dict):
                    row = RowProblem(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                row = RowProblem(str(e))
            if isinstance(row, dict):
                columns.update(dict.fromkeys(row))
            rows.append(row)
            locations.append((record.file, record.number))
        tables.append(Table(source=source, columns=list(columns), rows=rows, locations=locations))
    return tables
