"""Local data files are read without `datasets` (issue 25, item 3): a process in which
`import datasets` fails reads every local format, a folder, a --max-samples draw, and runs
train_sft.py; a hub dataset name is then refused in one line. The rows read are the rows
`datasets.load_dataset` gives (an independent reference, where it is installed) for each
format and for which files of a folder are read, on data with odd cases."""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import textwrap

import pytest

from anita_core.assets import SAMPLE_FILES, sample_path
from anita_core.data import BadRowError, DataStats, read_rows, read_table
from anita_core.data.streaming import sample_records
from tests.run_cli import REPO, TINY, run_script

HUB = "someone/missing-dataset"
NEEDS_DATASETS = (f"{HUB}: not a local file or folder; reading a hub dataset needs the 'datasets' "
                  f"package (pip install datasets, or pip install -e \".[hub]\")")

# a meta path finder that refuses the modules named in ANITA_TEST_BLOCK, as a Python
# without them installed does (put first on the path as sitecustomize.py)
BLOCKER = textwrap.dedent("""
    import os, sys
    BLOCKED = set(os.environ.get("ANITA_TEST_BLOCK", "").split(","))
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocker())
""")

CHILD = textwrap.dedent("""
    import json, sys
    from anita_core.data import DataStats, read_rows, read_table
    out = {"files": {}, "drawn": {}}
    try:
        import datasets
        out["blocked"] = False
    except ImportError:
        out["blocked"] = True
    for path in sys.argv[1:]:
        try:
            out["files"][path] = read_rows(path, stats=DataStats())
            out["drawn"][path] = read_rows(path, stats=DataStats(), max_samples=7, seed=3)
        except ValueError as e:
            out["files"][path] = str(e)
    for draw in (None, 3):
        try:
            read_rows(%r, stats=DataStats(), max_samples=draw)
        except ValueError as e:
            out[f"hub, max_samples={draw}"] = str(e)
    out["imported"] = sorted(m for m in ("datasets", "pyarrow", "pandas") if m in sys.modules)
    print(json.dumps(out))
""" % HUB)


def blocked_env(tmp_path, *modules: str) -> dict:
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{folder}{os.pathsep}{REPO}", "ANITA_TEST_BLOCK": ",".join(modules)}


def run_blocked(tmp_path, modules, paths):
    env = {**os.environ, **blocked_env(tmp_path, *modules)}
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


ODD_ROWS = [
    {"instruction": "Perché il cielo è blu? 🌤", "input": "", "output": "Per la diffusione di Rayleigh.",
     "messages": [{"role": "user", "content": "Ciao, 你好, مرحبا"}, {"role": "assistant", "content": ""}],
     "n": 7, "ok": True},
    {"instruction": "Riga con \"virgolette\", virgole, e\nun a capo\ttab", "input": None,
     "output": "\u2028 separatore di riga, \\ barra", "messages": [], "n": 0, "ok": False},
    {"instruction": "", "input": "007", "output": "1.50",
     "messages": [{"role": "system", "content": "Sei utile."}, {"role": "user", "content": " "},
                  {"role": "assistant", "content": "Sì."}], "n": None, "ok": None},
    {"instruction": "Ultima", "input": "-0", "output": "1e3", "messages": None, "n": -12, "ok": True},
]
FLAT = ("instruction", "input", "output")      # the text columns, the ones CSV holds


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path


def odd_files(tmp_path):
    flat = [{k: r[k] for k in FLAT} for r in ODD_ROWS]
    files = {fmt: write(tmp_path / f"odd.{fmt}", ODD_ROWS, fmt) for fmt in ("jsonl", "json", "parquet")}
    files["csv"] = write(tmp_path / "odd.csv", flat, "csv")
    return files


# ------------------------------------------------------------------ without `datasets`
def test_local_data_is_read_in_a_python_without_datasets(tmp_path):
    rows = [{"instruction": f"Domanda {i}: perché?", "input": "" if i % 2 else "contesto",
             "output": f"Risposta {i} è 😀"} for i in range(12)]
    paths = [sample_path(shape) for shape in SAMPLE_FILES]
    for fmt in ("jsonl", "json", "csv", "parquet", "jsonl.gz"):
        paths.append(write(tmp_path / f"rows.{fmt}", rows, fmt))
    folder = tmp_path / "shards"
    folder.mkdir()
    write(folder / "a.jsonl", rows[:5], "jsonl")
    write(folder / "b.csv", rows[5:9], "csv")
    write(folder / "c.parquet", rows[9:], "parquet")
    paths.append(folder)
    got = run_blocked(tmp_path, ["datasets"], paths)
    assert got["blocked"] is True and got["imported"] == ["pyarrow"]
    for path in map(str, paths):          # as read here, where `datasets` can be imported
        assert got["files"][path] == json.loads(json.dumps(read_rows(path, stats=DataStats())))
        drawn = read_rows(path, stats=DataStats(), max_samples=7, seed=3)
        assert got["drawn"][path] == json.loads(json.dumps(drawn)) and len(drawn) == 7
    assert [row for _, row in read_rows(str(folder), stats=DataStats())] == [
        {"system": "", **row} for row in rows]
    # a hub dataset name, read whole and streamed: one line saying what to install
    assert got["hub, max_samples=None"] == got["hub, max_samples=3"] == NEEDS_DATASETS


def test_without_pyarrow_json_and_csv_read_and_parquet_says_what_to_install(tmp_path):
    rows = [{"text": "Uno."}, {"text": "Due."}]
    paths = [write(tmp_path / f"rows.{fmt}", rows, fmt) for fmt in ("jsonl", "json", "csv", "parquet")]
    got = run_blocked(tmp_path, ["datasets", "pyarrow"], paths)
    assert got["blocked"] is True and got["imported"] == []
    for path in paths[:3]:
        assert got["files"][str(path)] == [["text", {"text": "Uno."}], ["text", {"text": "Due."}]]
    assert got["files"][str(paths[3])] == (f"{paths[3]}: reading Parquet needs the 'pyarrow' package "
                                           f"(pip install pyarrow)")


def test_train_sft_runs_without_datasets(tmp_path):
    """The bundled main job's data (the sample files, drawn with --max-samples, and
    read whole) in a Python where `import datasets` fails: the lent GPU machine's."""
    at = TINY.index("--max-samples")
    whole = TINY[:at] + TINY[at + 2:]      # no draw: every row of the file, read whole
    for name, flags in (("drawn", TINY), ("whole", whole)):
        proc = run_script("train_sft.py", *flags, "--max-steps", "1", "--output-dir", tmp_path / name,
                          timeout=300, **blocked_env(tmp_path, "datasets"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "train loss:" in proc.stderr


def test_the_blocker_does_block(tmp_path):
    """The tests above would pass vacuously if the child could import `datasets`."""
    env = {**os.environ, **blocked_env(tmp_path, "datasets")}
    proc = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'datasets'" in proc.stderr


# ------------------------------------------------------------------ the same rows as `datasets`
def reference(path, fmt, **kwargs):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f))
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
    builder = {"jsonl": "json", "jsonl.gz": "json"}.get(fmt, fmt)
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train",
                                    cache_dir=str(path.parent / "hf-cache"), **kwargs)
    return dataset.column_names, dataset.to_list()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "jsonl.gz"])
def test_each_format_reads_the_rows_datasets_reads(tmp_path, fmt):
    if fmt == "jsonl.gz":
        path = write(tmp_path / "odd.jsonl.gz", ODD_ROWS, fmt)
    else:
        path = odd_files(tmp_path)[fmt]
    table = read_table(str(path))
    columns, rows = reference(path, fmt)
    assert table.problems == {}
    assert (table.columns, table.rows) == (columns, rows)
    # and types, not only equality (1 == 1.0 == True): "007" in CSV is text, 7 in JSON an int
    assert [[type(v) for v in r.values()] for r in table.rows] == [[type(v) for v in r.values()] for r in rows]
    assert read_table(str(path), max_rows=2).rows == rows[:2]


def test_rows_with_missing_keys_byte_order_marks_and_csv_oddities_read_as_datasets_reads(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"a": "x", "b": [1, 2]}\n\n{"c": {"d": null}}\n{}\n')
    array = tmp_path / "array.json"
    array.write_bytes(b'\n  [{"z": 1, "a": "x"}, {"m": "y"}, {}]')
    csv_file = tmp_path / "odd.csv"
    csv_file.write_bytes(b'\xef\xbb\xbfa,b,c\r\n"x\r\ny",,3\r\n\r\n1\r\n  \r\n"",",",\xc3\xa8\r\n')
    cr_only = tmp_path / "cr.csv"
    cr_only.write_bytes(b"a,b\r1,2\r3,4\r")
    for path, fmt in ((jsonl, "jsonl"), (array, "json"), (csv_file, "csv"), (cr_only, "csv")):
        table = read_table(str(path))
        assert (table.columns, table.rows) == reference(path, fmt), path.name
    # an array after a byte-order mark too (`datasets` cannot read that one)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + array.read_bytes())
    assert read_table(str(bom)).rows == read_table(str(array)).rows


def test_what_differs_from_datasets_on_purpose(tmp_path):
    """CSV cells that pandas turns into missing values stay text; a row longer than the
    header is a bad row (pandas made its first cell an index, shifting the others)."""
    path = tmp_path / "rows.csv"
    path.write_text("instruction,output\nNA,None\nnull,nan\nCiao,Ciao,in più\nN/A,#N/A\n", encoding="utf-8")
    table = read_table(str(path))
    assert [table.rows[i] for i in (0, 1, 3)] == [{"instruction": "NA", "output": "None"},
                                                  {"instruction": "null", "output": "nan"},
                                                  {"instruction": "N/A", "output": "#N/A"}]
    assert table.problems == {2: "3 cells, but the header names 2 columns"}
    with pytest.raises(BadRowError, match=r"rows\.csv: row 3: 3 cells, but the header names 2 columns$"):
        read_rows(str(path), stats=DataStats())
    twice = tmp_path / "twice.csv"
    twice.write_text("text,text\nuno,due\n")
    with pytest.raises(ValueError, match=r"twice\.csv: line 1: the header names column 'text' twice"):
        read_table(str(twice))


FOLDERS = [   # (files, split): which files `datasets` reads, and in which order
    (["b.jsonl", "a10.jsonl", "a2.jsonl", "A.jsonl", "sub/c.jsonl", "a.jsonl", "a-b.jsonl"], "train"),
    ([".hidden.jsonl", ".dir/x.jsonl", "__pycache__/x.jsonl", "_kept/x.jsonl", "__kept.jsonl",
      "config.json", "dataset_info.json", "a.jsonl"], "train"),
    (["train.jsonl", "test.jsonl", "extra.jsonl"], "train"),
    (["train.jsonl", "test.jsonl", "extra.jsonl"], "test"),
    (["Train.jsonl", "mytrain.jsonl", "trainer.jsonl", "extra.jsonl"], "train"),
    (["my_train.jsonl", "2train.jsonl", "train0.jsonl", "dev.jsonl", "x.jsonl", "a-training.jsonl",
      "training.jsonl", "b.train.jsonl"], "train"),    # not by path: by pattern, then path
    (["my_train.jsonl", "x-dev.jsonl", "valid.jsonl", "interval.jsonl"], "validation"),
    (["training/a.jsonl", "x-dev/b.jsonl", "train.jsonl", "c.jsonl", "deep/eval/d.jsonl",
      "a_training/e.jsonl", "train-1/f.jsonl", "x/old-train/g.jsonl"], "train"),
    (["training/a.jsonl", "x-dev/b.jsonl", "train.jsonl", "c.jsonl", "deep/eval/d.jsonl"], "test"),
    (["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl",
      "data/test-00000-of-00001.jsonl", "other.jsonl", "train.jsonl"], "train"),
    (["a.jsonl.gz", "b.json", "c.jsonl"], "train"),
]


@pytest.mark.parametrize("files,split", FOLDERS)
def test_a_folder_reads_the_files_datasets_reads(tmp_path, files, split):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    folder = tmp_path / "corpus"
    for name in files:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, [{"file": name}], "jsonl.gz" if name.endswith(".gz") else "jsonl")
    expected = [r["file"] for r in datasets.load_dataset(str(folder), split=split,
                                                         cache_dir=str(tmp_path / "hf-cache"))]
    table = read_table(str(folder), split=split)
    assert [r["file"] for r in table.rows] == expected
    assert [os.path.relpath(file, folder) for file, _ in table.locations] == expected
    drawn = sample_records([str(folder)], 100, seed=0, split=split)      # --max-samples: the same files
    assert [record.parsed()["file"] for record in drawn] == expected


def test_a_split_the_folder_lacks_is_named(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "test.jsonl", [{"text": "uno"}], "jsonl")
    write(folder / "extra.jsonl", [{"text": "due"}], "jsonl")
    for max_samples in (None, 5):
        with pytest.raises(ValueError, match=r"corpus: no 'train' files: the names of its files mark "
                                             r"the splits \['test'\]"):
            read_rows(str(folder), stats=DataStats(), max_samples=max_samples)


def test_a_folder_of_formats_and_columns_datasets_would_refuse_is_one_table(tmp_path):
    """Every format is read (`datasets` reads only the commonest one), columns are the
    union (`datasets` refuses files whose columns differ), and a bad row is named by its
    own file and row."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "a.jsonl", [{"text": "uno", "source": "x"}, {"text": "due", "source": "y"}], "jsonl")
    write(folder / "b.csv", [{"text": "tre"}], "csv")
    write(folder / "c.parquet", [{"text": "quattro", "extra": 4}, {"text": "", "extra": 5}], "parquet")
    table = read_table(str(folder))
    assert table.columns == ["text", "source", "extra"]
    assert [r["text"] for r in table.rows] == ["uno", "due", "tre", "quattro", ""]
    assert table.rows[2] == {"text": "tre", "source": None, "extra": None}
    with pytest.raises(BadRowError, match=r"c\.parquet: row 2: field 'text' is empty"):
        read_rows(str(folder), stats=DataStats())
