"""A full disk, wherever the run writes, ends it with one line (what was being
written, where, the bytes it needed and those free, the last complete
checkpoint) and exit code 5; the partial files are removed and nothing complete
is touched, so the run resumes once there is space.

The real thing runs on small tmpfs mounts (skipped, with the reason, where this
process may not mount one); where it may not, the same path is driven by the
one fault anita injects into its own checkpoint writer (ANITA_STOP_AT=ENOSPC@
checkpoint:K, anita_core/train/stop_points.py), and the recognition of both
spellings of the error by /dev/full, which fails every write with ENOSPC. The CLI
children use the torch kernel backend: this is about files, not kernels."""
from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from anita_core.cli.common import EXIT_DISK_FULL
from anita_core.train.file_manifest import damage
from anita_core.train.run_folder import append_metrics
from anita_core.train.storage_faults import DiskFull, disk_full_guard, disk_full_message
from tests.run_cli import TINY, metric_steps, run_script

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")
SIZE = r"[\d.]+ (?:bytes|KiB|MiB|GiB)"
DISK_FULL_LINE = re.compile(
    rf"error: disk full writing (?P<what>.+?) (?P<path>/\S+) \(needs ~{SIZE}; (?P<free>{SIZE}) free "
    r"there\): No space left on device\. Its partial files were removed and nothing complete was "
    r"touched; last complete checkpoint: (?P<last>\S+); free some space, then "
    r"(?:continue with --resume|run again)")


@contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` for the test; skipped where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full path is covered by the injected-fault test")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here ({proc.stderr.strip() or proc.returncode}): "
                    f"the disk-full path is covered by the injected-fault test")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill a file system until a write fails with ENOSPC; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def the_error(stderr: str) -> re.Match:
    """The run's one error line, matched; nothing of a traceback around it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr[-3000:]
    match = DISK_FULL_LINE.fullmatch(errors[0])
    assert match, errors[0]
    return match


def no_temp_files(folder: Path) -> None:
    hidden = [p for p in folder.rglob(".*")]
    assert not hidden, f"partial files left behind: {hidden}"


# safetensors' spelling (0.8), as a real full disk gives it: the tmpfs test below
# meets the real one. Never point safetensors at /dev/full: it writes a temp file
# and renames it over the target, which replaces the device node.
SAFETENSORS_DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@needs_dev_full
def test_a_full_disk_is_recognised_in_both_spellings_and_nothing_else_is():
    with pytest.raises(DiskFull) as python_error:
        with disk_full_guard("metrics", DEV_FULL, 10):
            with open(DEV_FULL, "wb", buffering=0) as f:      # every write: ENOSPC
                f.write(b"0123456789")
    assert python_error.value.errno == errno.ENOSPC and python_error.value.needed == 10
    with pytest.raises(DiskFull) as rust_error:
        with disk_full_guard("checkpoint", "/somewhere/step-00000003", 2048):
            raise SafetensorError(SAFETENSORS_DISK_FULL)
    assert (rust_error.value.what, rust_error.value.path) == ("checkpoint", Path("/somewhere/step-00000003"))
    line = disk_full_message(rust_error.value, Path("/somewhere/step-00000002"))
    assert line.startswith("error: disk full writing checkpoint /somewhere/step-00000003 (needs ~2.0 KiB; ")
    assert line.endswith("last complete checkpoint: /somewhere/step-00000002; free some space, then "
                         "continue with --resume")
    with pytest.raises(DiskFull) as quota:
        with disk_full_guard("the adapter", "/somewhere/adapter"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert disk_full_message(quota.value, None) == (
        "error: disk quota exceeded writing the adapter /somewhere/adapter: Disk quota exceeded. Its "
        "partial files were removed and nothing complete was touched; last complete checkpoint: none; "
        "free some space, then run again")
    for other in (OSError(errno.EACCES, "Permission denied"), SafetensorError("invalid header"),
                  SafetensorError("I/O error: Permission denied (os error 13)")):
        with pytest.raises(type(other)) as passed:
            with disk_full_guard("metrics", "/somewhere/metrics.jsonl"):
                raise other
        assert passed.value is other


def test_injected_disk_full_at_a_checkpoint_keeps_the_others_and_resumes(tmp_path):
    """Needs no mount: the writer meets ENOSPC while checkpoint 3 is written."""
    out = tmp_path / "run"
    args = [*TINY, "--max-steps", 4, "--save-steps", 1, "--save-total-limit", 0, "--output-dir", out]
    proc = run_script("train_sft.py", *args, stop_at="ENOSPC@checkpoint:3", ANITA_BACKEND="torch")
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
    error = the_error(proc.stderr)
    root = out / "checkpoints"
    assert (error["what"], error["path"]) == ("checkpoint", str(root / "step-00000003"))
    assert error["last"] == str(root / "step-00000002")
    no_temp_files(out)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert all(damage(p) is None for p in root.glob("step-*"))
    proc = run_script("train_sft.py", *args, "--resume", ANITA_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {root / 'step-00000002'} at step 2" in proc.stderr
    assert metric_steps(out) == [1, 2, 3, 4]


def test_a_disk_that_fills_up_stops_the_run_with_one_line_and_the_copy_resumes(tmp_path):
    """The issue's case: the output folder on a 3 MB tmpfs, a checkpoint every step.
    The copy on a roomy disk then resumes, finishes, and meets a full disk again in
    its merged export (a 256 KB tmpfs): the adapter before it stays complete."""
    args = [*TINY, "--max-steps", 12, "--save-steps", 1, "--save-total-limit", 0]
    with small_tmpfs(tmp_path / "small", "3m") as small:
        out = small / "run"
        proc = run_script("train_sft.py", *args, "--output-dir", out, ANITA_BACKEND="torch")
        assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
        error = the_error(proc.stderr)
        assert error["what"] == "checkpoint"
        failed = int(error["path"].rsplit("-", 1)[1])
        saved = sorted(out.glob("checkpoints/step-*"))
        assert [p.name for p in saved] == [f"step-{k:08d}" for k in range(1, failed)]
        assert error["last"] == str(saved[-1])
        assert all(damage(p) is None for p in saved)
        no_temp_files(out)
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)                                   # whole lines only
        copy = tmp_path / "copy"
        shutil.copytree(out, copy)
    with small_tmpfs(tmp_path / "tiny", "256k") as tiny:
        export = tiny / "merged"
        proc = run_script("train_sft.py", *args, "--output-dir", copy, "--resume", "--merge-export", export,
                          ANITA_BACKEND="torch")
        assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
        error = the_error(proc.stderr)
        assert (error["what"], error["path"]) == ("the merged export", str(export))
        assert error["last"] == str(copy / "checkpoints" / "step-00000012")
        assert not export.exists() and not list(tiny.iterdir()), "the partial export was removed"
    assert f"resumed from {copy / 'checkpoints' / f'step-{failed - 1:08d}'}" in proc.stderr
    assert metric_steps(copy) == list(range(1, 13))
    assert damage(copy / "adapter") is None and (copy / "adapter" / "manifest.json").is_file()


def test_a_full_disk_while_the_dpo_reference_store_is_written(tmp_path):
    with small_tmpfs(tmp_path / "small", "1m") as small:
        out = small / "run"
        out.mkdir()
        (out / "run.lock").write_text("1\n")       # its page is reused by this run's lock
        fill(small)
        proc = run_script("train_dpo.py", "--no-progress", "--eval-split", 0, "--batch-size", 2,
                          "--max-samples", 4, "--max-length", 48, "--max-prompt-length", 0,
                          "--max-steps", 1, "--output-dir", out, ANITA_BACKEND="torch")
        assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
        error = the_error(proc.stderr)
        assert (error["what"], error["path"]) == ("the DPO reference store", str(out / "reference_logps"))
        assert error["free"] == "0 bytes" and error["last"] == "none"
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def test_safetensors_on_a_full_disk_says_so_as_expected(tmp_path):
    with small_tmpfs(tmp_path / "small", "64k") as small:
        fill(small)
        with pytest.raises(SafetensorError) as e:
            save_file({"t": torch.zeros(4096)}, str(small / "t.safetensors"))
        assert SAFETENSORS_DISK_FULL in str(e.value)


def test_a_metrics_line_cut_short_by_a_full_disk_is_cut_off(tmp_path):
    with small_tmpfs(tmp_path / "small", "64k") as small:
        append_metrics(small, {"step": 1, "loss": 2.0})
        before = (small / "metrics.jsonl").read_bytes()
        fill(small)
        # the record's first bytes fit in the file's last page (a short write: the kernel takes
        # them), the rest needs a page there is not: ENOSPC, and the bytes taken are cut off again
        with pytest.raises(DiskFull) as e:
            append_metrics(small, {"step": 2, "note": "x" * 8000})
        assert e.value.what == "metrics" and e.value.path == small / "metrics.jsonl"
        assert (small / "metrics.jsonl").read_bytes() == before
