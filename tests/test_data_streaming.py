"""--max-samples over corpora larger than memory: a seeded, uniform draw of N
rows (reservoir sampling) streamed from a folder of shards in every supported
format; same seed -> same rows, another seed -> other rows, memory that does
not grow with the corpus, malformed drawn rows reported by file and line."""
from __future__ import annotations

import csv
import gzip
import json
import math
import tracemalloc

import pytest

from anita_core.assets import TOKENIZER_DIR
from anita_core.data import BadRowError, DataStats, SFTDataConfig, build_sft_data, load_tokenizer, read_rows
from anita_core.data.streaming import reservoir_sample, sample_records, shard_files


def _text(shard, i):
    return f"Riga {i} del frammento {shard}: il Po nasce dal Monviso e sfocia nell'Adriatico."


def write_corpus(folder, rows_per_shard):
    """Six shards, one per format (and one in a subfolder); returns every text in corpus order."""
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    layout = ["a.jsonl", "b.jsonl.gz", "c.parquet", "d.csv", "e.json", "sub/f.jsonl"]
    texts = {}
    for shard in layout:
        rows = [{"text": _text(shard, i), "source": "mc4"} for i in range(rows_per_shard)]
        texts[shard] = [r["text"] for r in rows]
        path = folder / shard
        if shard.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=97)
        elif shard.endswith(".csv"):
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=["text", "source"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            opener = gzip.open if shard.endswith(".gz") else open
            with opener(path, "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (folder / "README.md").write_text("not data")        # ignored: not a data file
    return [t for shard in sorted(layout, key=lambda s: str(folder / s)) for t in texts[shard]]


def _draw(source, n, seed, **kwargs):
    stats = DataStats()
    rows = read_rows(source, stats=stats, max_samples=n, seed=seed, **kwargs)
    return [row["text"] for _, row in rows], stats


def test_reservoir_sample_is_uniform_and_reproducible():
    population, n, draws = 40, 7, 6000
    counts = [0] * population
    for seed in range(draws):
        sample = reservoir_sample(range(population), n, seed)
        assert len(sample) == n == len(set(sample))
        for item in sample:
            counts[item] += 1
    p = n / population                    # each item's inclusion probability
    sigma = math.sqrt(draws * p * (1 - p))
    # 5 sigma per item: a fixed set of seeds, so this either always passes or never
    assert all(abs(c - draws * p) < 5 * sigma for c in counts), counts
    # the first and the last items are as likely as the middle ones (no order bias)
    assert abs(counts[0] + counts[-1] - 2 * draws * p) < 5 * sigma * math.sqrt(2)
    assert reservoir_sample(range(10**5), 5, 1) == reservoir_sample(range(10**5), 5, 1)
    assert reservoir_sample(range(10**5), 5, 1) != reservoir_sample(range(10**5), 5, 2)
    assert sorted(reservoir_sample(range(3), 5, 0)) == [0, 1, 2]     # fewer than n: all of them
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="positive integer"):
            reservoir_sample(range(3), bad, 0)


def test_draw_from_a_folder_of_shards(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", rows_per_shard=100)     # 600 rows, 6 shards
    assert len(shard_files(str(tmp_path / "corpus"))) == 6
    n = 60
    first, stats = _draw(str(tmp_path / "corpus"), n, seed=5)
    assert stats.rows_read == n and len(first) == n == len(set(first))
    assert set(first) <= set(corpus)
    # corpus order, every format contributes (each holds 1/6 of the rows)
    assert first == sorted(first, key=corpus.index)
    for shard in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.csv", "e.json", "sub/f.jsonl"):
        assert any(f"frammento {shard}:" in t for t in first), shard
    again, _ = _draw(str(tmp_path / "corpus"), n, seed=5)
    other, _ = _draw(str(tmp_path / "corpus"), n, seed=6)
    assert again == first
    assert other != first and len(set(other) & set(first)) < n // 2
    # more rows asked for than there are: all of them, in order
    everything, _ = _draw(str(tmp_path / "corpus"), 10_000, seed=0)
    assert everything == corpus
    # each drawn row's location is its file and line (JSON lines) or record number
    locations = []
    rows = read_rows(str(tmp_path / "corpus"), stats=DataStats(), max_samples=n, seed=5,
                     locations=locations)
    for (_, row), (file, number) in zip(rows, locations):
        shard = file.split("corpus/")[1]
        assert row["text"] == _text(shard, number - 1), (file, number)
        if shard == "a.jsonl":
            line = open(file, encoding="utf-8").read().splitlines()[number - 1]
            assert json.loads(line)["text"] == row["text"]
    # several sources are one population
    both, _ = _draw([str(tmp_path / "corpus" / "a.jsonl"), str(tmp_path / "corpus" / "d.csv")], 50, 1)
    assert {t.split(":")[0].split()[-1] for t in both} == {"a.jsonl", "d.csv"}


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    n = 100
    small = tmp_path / "small"
    large = tmp_path / "large"
    # both larger than every buffer (a parquet batch is 256 rows)
    write_corpus(small, rows_per_shard=500)           # 3,000 rows: 30 x n
    write_corpus(large, rows_per_shard=5000)          # 30,000 rows: 300 x n
    _draw(str(small), n, seed=0)                      # imports and caches outside the measurement

    def peak(folder):
        tracemalloc.start()
        try:
            rows, _ = _draw(str(folder), n, seed=0)
            assert len(rows) == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    small_peak, large_peak = peak(small), peak(large)
    corpus_bytes = sum(len(_text("sub/f.jsonl", i)) for i in range(5000)) * 6
    print(f"peak traced memory: {small_peak / 1e6:.2f} MB (3,000 rows), "
          f"{large_peak / 1e6:.2f} MB (30,000 rows, ~{corpus_bytes / 1e6:.1f} MB of text)")
    # 10x the corpus, same n: the peak may differ by noise, not by the corpus
    assert large_peak < 1.2 * small_peak + 64 * 1024
    assert large_peak < corpus_bytes / 2


def test_drawn_rows_are_validated_and_located(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.jsonl").write_text('{"text": "uno"}\n\n{"text": \n{"text": "tre"}\n[1, 2]\n')
    with pytest.raises(BadRowError, match=r"x\.jsonl: row 3: not valid JSON"):
        _draw(str(folder), 10, seed=0)
    texts, stats = _draw(str(folder), 10, seed=0, skip_bad_rows=True)
    assert texts == ["uno", "tre"] and stats.skipped_bad_rows == 2
    assert "x.jsonl: row 5: expected a JSON object, got list" in stats.bad_row_examples[1]
    (folder / "y.csv").write_text("text\n17\n\n")      # CSV cells stay text
    records = sample_records([str(folder / "y.csv")], 5, 0)
    assert [r.parsed() for r in records] == [{"text": "17"}]
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        _draw(str(tmp_path / "nowhere"), 3, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no data files"):
        _draw(str(tmp_path / "empty"), 3, seed=0)


def test_sft_data_from_shards_with_progress(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", rows_per_shard=50)
    tok = load_tokenizer(TOKENIZER_DIR)
    data = build_sft_data(SFTDataConfig(str(tmp_path / "corpus"), max_samples=40, seed=2,
                                        max_seq_length=64, progress=True), tok)
    assert data.stats.rows_read == 40 and data.stats.examples == 40
    texts = {tok.decode(d.input_ids[1:-1]) for d in data.train}
    assert texts <= set(corpus)
    err = capsys.readouterr().err
    assert "drawing 40 rows" in err and "tokenizing" in err
