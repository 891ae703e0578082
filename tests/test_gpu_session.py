"""bench/gpu_session.sh, rehearsed: the smoke run goes through every step and entry point
of the GPU session at smoke sizes on this CPU and writes every CSV with its columns and
the anita and transformers rows; --plan's budgets fit the 480 s; bad input is one line
and exit 2; a step stopped at its budget keeps its rows; the peers are installed offline
from wheels, and a missing wheels folder is reported, the rest running.

The smoke session runs its measuring steps two at a time (--jobs 2: the CPU rehearsal
shares no device; a GPU run is sequential)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import common, headline, kernels, max_context_step, nf4_matmul, pytest_rows, session, train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"


def run_session(*args, env=None, timeout=900):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **(env or {}))
    env.pop("ANITA_AUTOTUNE", None)
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("session") / "out"
    start = time.perf_counter()
    proc = run_session(out, "--smoke", "--jobs", "2")
    print(f"[gpu_session smoke] wall {time.perf_counter() - start:.1f} s")
    return proc, out


def test_smoke_session_exits_0_and_prints_the_plan_first(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith(f"{session.PROG} plan, smoke run")
    assert "== headline (CPU smoke value at smoke sizes" in proc.stdout


def test_summary_names_every_step_with_status_seconds_and_rows(smoke):
    _, out = smoke
    header, rows = read(out / "summary.csv")
    assert header == ["step", "status", "seconds", "budget_s", "rows", "finished"]
    assert [r["step"] for r in rows] == list(session.STEP_NAMES)
    assert all(r["status"] == "exit 0" for r in rows), rows
    text = (out / "summary.txt").read_text().splitlines()
    assert len(text) == len(session.STEP_NAMES)
    assert text[2].startswith("train_anita: exit 0, ") and " s of 240 s; 2 rows in train_anita.csv" \
        in text[2]


@pytest.mark.parametrize("name,columns", [
    ("train_anita.csv", train.COLUMNS), ("train_peers.csv", train.COLUMNS),
    ("kernels.csv", kernels.COLUMNS), ("nf4_matmul.csv", nf4_matmul.COLUMNS),
    ("max_context.csv", max_context_step.COLUMNS)])
def test_every_measuring_csv_has_its_columns_and_smoke_labels(smoke, name, columns):
    _, out = smoke
    header, rows = read(out / name)
    assert header == common.META_COLUMNS + columns
    assert rows and all(r["label"] == common.SMOKE_LABEL for r in rows)


def test_anita_and_transformers_rows_were_measured(smoke):
    _, out = smoke
    train_rows = read(out / "train_anita.csv")[1] + read(out / "train_peers.csv")[1]
    ok = {(r["framework"], r["measurement"]) for r in train_rows if r["status"] == "ok"}
    for framework in ("anita", "hf_peft_bnb"):
        assert {(framework, "throughput"), (framework, "dpo_step")} <= ok, train_rows
    anita = [r for r in train_rows if r["framework"] == "anita"]
    assert all(float(r["predicted_peak_mib"]) > 0 for r in anita)
    liger = [r for r in train_rows if r["framework"] == "hf_peft_bnb_liger"]
    assert len(liger) == 2 and all(r["status"].startswith("skipped: Liger-Kernel runs only on a "
                                                          "CUDA GPU") for r in liger)
    kernel_rows = read(out / "kernels.csv")[1]
    for op, provider in (("nf4_dequantize", "ours"), ("nf4_dequantize", "bitsandbytes"),
                         ("flash_attention", "ours"), ("flash_attention", "sdpa_flash")):
        assert any(r["op"] == op and r["provider"] == provider and r["status"] == "ok"
                   for r in kernel_rows), (op, provider)
    matmul_rows = read(out / "nf4_matmul.csv")[1]
    for provider in ("ours", "ours_fused", "bnb_dequant+matmul", "dense_matmul"):
        assert any(r["provider"] == provider and r["status"] == "ok" for r in matmul_rows), provider
    (long_context,) = read(out / "max_context.csv")[1]
    assert long_context["status"] == "ok" and int(long_context["tried_seq"]) > 0


def test_gpu_tests_and_step_anatomy_and_device(smoke):
    _, out = smoke
    header, rows = read(out / "gpu_tests.csv")
    assert header == pytest_rows.COLUMNS
    names = {r["nodeid"].split("::")[-1].split("[")[0] for r in rows}
    assert {"test_gpu_bf16_training_step_matches_transformers_peft_at_8b_layer_shapes",
            "test_gpu_bf16_fused_qkv_lora_at_small_m", "test_bf16_fused_path_with_dropout_at_small_m",
            "test_gpu_offload_path_equals_recompute_and_pins_host_memory"} <= names
    assert all(r["outcome"] == "skipped" for r in rows)            # no CUDA here
    anatomy = json.loads((out / "step_anatomy.json").read_text())
    assert anatomy["device"] == "cpu" and anatomy["layers"]
    device = json.loads((out / "device.json").read_text())
    assert device["cuda_device"] is False and device["autotune"] == "pruned"


def test_headline_rows_are_labelled_as_smoke_and_cover_every_section(smoke):
    _, out = smoke
    header, rows = read(out / "headline.csv")
    assert header == headline.COLUMNS
    for r in rows:   # a smoke value, or someone else's published figure, never a GPU number here
        assert headline.SMOKE_LABEL in r["label"] or (
            r["status"] == "published" and r["label"] == "published figure, not a measurement"), r
    assert all(r["device"] and r["date"] for r in rows)
    sections = {r["section"] for r in rows}
    assert {"training (SFT)", "training (DPO, policy only)", "memory", "long context",
            "nf4_dequantize", "attention forward", "attention both", "nf4_matmul",
            "bf16 parity"} <= sections
    sft = {r["provider"]: r for r in rows if r["section"] == "training (SFT)"}
    assert float(sft["anita"]["value"]) > 0 and sft["anita"]["command"].startswith("python -m bench.train")
    ratio = sft["anita / transformers+PEFT+bitsandbytes (SDPA)"]
    assert float(ratio["ratio"]) == pytest.approx(
        float(sft["anita"]["value"]) / float(sft["transformers+PEFT+bitsandbytes (SDPA)"]["value"]),
        rel=1e-3)
    unsloth = sft["Unsloth (derived, not measured)"]
    assert unsloth["label"].startswith("derived:") and unsloth["source"] == headline.UNSLOTH_PUBLISHED["source"]


# ------------------------------------------------------------------ plan and bad input
def test_plan_prints_every_step_and_budgets_within_480_s():
    proc = run_session("--plan")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    for s in session.STEPS:
        assert any(line.split()[:2] == [s.name, str(s.gpu_budget_s)] for line in lines), s.name
    total = sum(s.gpu_budget_s for s in session.STEPS)
    (total_line,) = [line for line in lines if line.split()[:1] == ["total"]]
    assert total_line.split()[1:3] == [str(total), "s"] and total <= 470   # 480 s with slack


@pytest.mark.parametrize("args,word", [
    ((), "OUT"), (("OUT_PLACEHOLDER", "--fast"), "--fast"),
    (("OUT_PLACEHOLDER", "--jobs", "2"), "--jobs"),
    (("OUT_PLACEHOLDER", "--only", "train"), "--only"),
    (("OUT_PLACEHOLDER", "--budget", "kernels=soon"), "--budget")])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, word):
    args = [str(tmp_path / "new") if a == "OUT_PLACEHOLDER" else a for a in args]
    proc = run_session(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{session.PROG}: error: ")
    assert word in proc.stderr and not (tmp_path / "new").exists()


def test_an_interpreter_without_the_projects_packages_is_one_line_and_exit_2(tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(session, "REQUIRED_MODULES", ("torch", "no_such_module_of_anita"))
    monkeypatch.setenv("PYTHON", "/usr/bin/python3")
    with pytest.raises(SystemExit) as e:
        session.main([str(tmp_path / "new"), "--smoke"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"{session.PROG}: error: /usr/bin/python3 cannot import no_such_module_of_anita; "
                   "run it with the project's interpreter (PYTHON=.venv/bin/python "
                   "bench/gpu_session.sh OUT, or activate the venv)\n")
    assert not (tmp_path / "new").exists()


def test_an_earlier_session_is_not_overwritten(tmp_path):
    (tmp_path / "summary.txt").write_text("an earlier session\n")
    proc = run_session(tmp_path, "--smoke")
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (tmp_path / "summary.txt").read_text() == "an earlier session\n"


# ------------------------------------------------------------------ budgets and peers
def test_a_step_stopped_at_its_budget_keeps_the_rows_it_wrote(tmp_path, monkeypatch, capsys):
    """A stand-in step writes two rows, flushes, and then never ends: the runner stops
    it at its budget, and the rows and the summary line remain."""
    script = ("import csv, sys, time\n"
              "f = open(sys.argv[1], 'w', newline=''); w = csv.writer(f)\n"
              "w.writerow(['op', 'status']); w.writerow(['a', 'ok']); w.writerow(['b', 'ok'])\n"
              "f.flush()\n"
              "while True: time.sleep(60)\n")
    monkeypatch.setattr(session, "step_command",
                        lambda name, out, smoke, py: [py, "-c", script, str(out / "kernels.csv")])
    code = session.main([str(tmp_path), "--smoke", "--only", "kernels", "--budget", "kernels=15"])
    assert code == 1
    (line,) = (tmp_path / "summary.txt").read_text().splitlines()
    assert line.startswith("kernels: exit 124 (stopped at its budget), ") and \
        line.endswith("of 15 s; 2 rows in kernels.csv"), line
    assert read(tmp_path / "kernels.csv")[1] == [{"op": "a", "status": "ok"}, {"op": "b", "status": "ok"}]


def test_a_missing_wheels_folder_is_one_line_the_rest_runs_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session, "peer_missing", lambda module: module == "bitsandbytes")
    code = session.main([str(tmp_path), "--smoke", "--only", "wheels,headline",
                         "--wheels", str(tmp_path / "no-wheels")])
    assert code == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l]
    assert errors == [f"{session.PROG}: error: bitsandbytes not installed: no wheels folder "
                      f"{tmp_path / 'no-wheels'} (bench/fetch_wheels.sh downloads them); their rows "
                      "say \"not installed\", the rest runs"]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("wheels: exit 2") and lines[1].startswith("headline: exit 0")


def test_a_peer_that_is_not_importable_says_not_installed_and_why(monkeypatch):
    from bench import train_models
    from bench.cases import Unavailable
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)     # import bitsandbytes fails
    monkeypatch.setenv("ANITA_PEERS_NOT_INSTALLED", "bitsandbytes: no wheels folder bench/wheels")
    with pytest.raises(Unavailable, match="not importable .*; not installed: no wheels folder "
                                          "bench/wheels"):
        train_models._hf_modules()


def fake_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of a distribution 'fake-peer' (module fake_peer)."""
    path = folder / "fake_peer-1.0-py3-none-any.whl"
    info = "fake_peer-1.0.dist-info"
    files = {"fake_peer/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: fake-peer\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_missing_peers_are_installed_offline_from_the_wheels_folder(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels)
    site = tmp_path / "site"
    monkeypatch.setattr(session, "PEERS", {"fake-peer": ("fake_peer", True)})
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, ANITA_SESSION_SITE=str(site), PIP_NO_INDEX="1")
    status, still, why = session.install_peers(out, wheels, sys.executable, env)
    assert (status, still, why) == ("exit 0", [], ""), (out / "wheels.log").read_text()
    assert (site / "fake_peer" / "__init__.py").read_text() == "VALUE = 42\n"
