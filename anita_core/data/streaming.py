"""Sources larger than memory: rows streamed one at a time from a local file or
folder of shards (.jsonl / .json / .parquet / .csv, and .jsonl.gz / .json.gz; read
by table.file_rows, the reader of a whole table too) or from a hub dataset
(`datasets` streaming, when online), and a seeded, uniform draw of N of them in
O(N) memory (reservoir sampling).

The draw: every record of every source, in order (sources as given; a folder's
files as table.shard_files picks and sorts them), is one candidate; ``reservoir_sample`` keeps N of them,
each N-subset equally likely (Li's "Algorithm L": the gaps between
replacements are drawn directly, so the random generator is called about
N log(total / N) times, not once per record). The same seed over the same
corpus draws the same rows. A JSON-lines record is kept as its raw line and
parsed only when drawn, so most of a large corpus is never parsed; a line that
is not JSON is then reported like any malformed row (file and line).
"""
from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TypeVar

from anita_core.data.rows import RowProblem
from anita_core.data.table import HUB_NAME, Table, file_rows, hub_datasets, parse_record, shard_files

T = TypeVar("T")

PROGRESS_EVERY = 4096          # records between progress-bar updates


@dataclass
class Record:
    """One candidate row: where it is, and the row as read (table.file_rows: a
    JSON line stays raw bytes until ``parsed``)."""
    source: str        # the source as given (file, folder or hub name)
    file: str          # the file it is in (the hub name for a hub dataset)
    number: int        # 1-based record number in that file (JSON lines: the line number)
    raw: Any           # a dict, a JSON value, the raw bytes of a JSON line, or an Unreadable

    def parsed(self) -> Dict[str, Any]:
        """The row; a raw JSON line is parsed now (a ValueError says why it is not a
        row: not UTF-8, not JSON, not an object; ``file`` and ``number`` say where)."""
        return parse_record(self.raw)


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


def records(source: str, *, split: str = "train", cache_dir: Optional[str] = None,
            is_hub_name: Callable[[str], bool] = lambda s: False) -> Iterator[Record]:
    """Every record of ``source`` (a data file, a folder of shards, or a hub
    dataset name), streamed."""
    path = os.path.expanduser(os.fspath(source))
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = shard_files(path, split)
    elif is_hub_name(path):
        yield from _hub_records(source, split, cache_dir)
        return
    else:
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub dataset name)")
    for file in files:
        for number, raw in file_rows(file):
            yield Record(source, file, number, raw)


def _hub_records(name: str, split: str, cache_dir: Optional[str]) -> Iterator[Record]:
    datasets = hub_datasets(name)
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
            except ValueError as e:
                row = RowProblem(str(e))
            if isinstance(row, dict):
                columns.update(dict.fromkeys(row))
            rows.append(row)
            locations.append((record.file, record.number))
        tables.append(Table(source=source, columns=list(columns), rows=rows, locations=locations))
    return tables
