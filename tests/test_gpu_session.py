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
    (anita,) = [line for line in text if line.startswith("train_anita: ")]
    assert anita.startswith("train_anita: exit 0, ") and " s of 240 s; 2 rows in train_anita.csv" \
        in anita


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
                        lambda name, out, smoke, py, family="llama": [py, "-c", script,
                                                                     str(out / "kernels.csv")])
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


# ------------------------------------------------------------------ correctness before speed
def test_the_parity_tests_run_right_after_device_and_wheels_within_the_budget():
    assert session.STEP_NAMES[:3] == ("device", "wheels", "gpu_tests")
    command = session.step_command("gpu_tests", Path("/o"), False, "py")
    parity = list(session.GPU_TEST_FILES)
    assert command[-len(session.gpu_test_files()):][:len(parity)] == parity
    assert sum(s.gpu_budget_s for s in session.STEPS) <= 470


# ------------------------------------------------------------------ one Triton cache
def _record_steps(monkeypatch):
    seen = {}

    def fake_run_step(argv, log, budget_s, env):
        seen[Path(log).stem] = dict(env)
        return 0
    monkeypatch.setattr(session, "run_step", fake_run_step)
    monkeypatch.setattr(session, "peer_missing", lambda module: False)
    return seen


@pytest.mark.parametrize("preset", [None, "user"])
def test_every_step_runs_with_the_same_triton_cache_and_autotuning_kept(tmp_path, monkeypatch,
                                                                        capsys, preset):
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    if preset:
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    else:
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    seen = _record_steps(monkeypatch)
    out = tmp_path / "out"
    assert session.main([str(out), "--smoke"]) == 0
    assert set(seen) == set(session.STEP_NAMES) - {"wheels"}       # wheels runs in the runner
    expected = str(tmp_path / "mine") if preset else str(out.resolve() / "triton_cache")
    assert {e["TRITON_CACHE_DIR"] for e in seen.values()} == {expected}
    assert {e["TRITON_CACHE_AUTOTUNING"] for e in seen.values()} == {"1"}


def test_triton_of_this_venv_reads_the_autotuning_cache_variable(monkeypatch):
    """TRITON_CACHE_AUTOTUNING is a knob of the installed triton (3.2 and later), so setting
    it is not a no-op: an Autotuner made under it keeps its results on disk."""
    from triton import knobs
    from triton.runtime import autotuner
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "1")
    assert knobs.autotuning.cache is True
    assert "cache_results" in autotuner.Autotuner.__init__.__code__.co_varnames


def test_the_smoke_session_records_its_triton_cache(smoke):
    _, out = smoke
    device = json.loads((out / "device.json").read_text())
    assert device["triton_cache_dir"] == str(out.resolve() / "triton_cache")
    assert device["triton_cache_autotuning"] == "1"


# ------------------------------------------------------------------ rows survive a kill
def _wait_for(path: Path, proc_ready, timeout=120.0):
    """Poll until ``path`` exists (the step says it reached its blocking point)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and proc_ready(), f"{path} never appeared"
        time.sleep(0.05)


def _run_and_kill_at_marker(argv, log, marker):
    """Run ``argv`` through the session's runner with a generous budget, and SIGKILL its
    process group (what the budget does last) as soon as it writes ``marker``."""
    import signal
    import threading
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "code", session.run_step(argv, log, 600, dict(os.environ, OMP_NUM_THREADS="1"))))
    thread.start()
    _wait_for(marker, thread.is_alive)
    (proc,) = list(session.RUNNING)
    os.killpg(proc.pid, signal.SIGKILL)
    thread.join(60)
    return result["code"]


BLOCK = ("open({marker!r}, 'w').close()\n"
         "open({fifo!r}).read()    # no writer ever: blocks until the process is killed\n")


def test_a_killed_pytest_step_keeps_a_row_per_finished_test(tmp_path, monkeypatch):
    """The gpu_tests step's own command (pytest with bench.pytest_rows) over a file of two
    passing tests and a third that blocks: killed there, gpu_tests.csv keeps two rows."""
    fifo, marker = tmp_path / "never", tmp_path / "blocked"
    os.mkfifo(fifo)
    test_file = tmp_path / "test_fake_gpu.py"
    test_file.write_text("import pytest\n\n"
                         "@pytest.mark.gpu\ndef test_one():\n    pass\n\n"
                         "@pytest.mark.gpu\ndef test_two():\n    pass\n\n"
                         "@pytest.mark.gpu\ndef test_three_blocks():\n" +
                         "".join(f"    {line}\n" for line in BLOCK.format(
                             marker=str(marker), fifo=str(fifo)).splitlines()))
    monkeypatch.setattr(session, "gpu_test_files", lambda: [str(test_file)])
    argv = session.step_command("gpu_tests", tmp_path, True, sys.executable)
    code = _run_and_kill_at_marker(argv, tmp_path / "gpu_tests.log", marker)
    assert code == -9
    header, rows = read(tmp_path / "gpu_tests.csv")
    assert header == pytest_rows.COLUMNS
    assert [(r["nodeid"].split("::")[-1], r["outcome"]) for r in rows] == [
        ("test_one", "passed"), ("test_two", "passed")]


def test_a_killed_measuring_step_keeps_every_row_its_sink_wrote(tmp_path):
    """train, kernels, nf4_matmul and max_context write through common.CsvSink: a step
    killed after two rows keeps both."""
    fifo, marker = tmp_path / "never", tmp_path / "blocked"
    os.mkfifo(fifo)
    script = ("import sys, torch\nfrom bench import common\n"
              "ctx = common.RunContext('fake', True, torch.device('cpu'), torch.float32)\n"
              "sink = common.CsvSink(sys.argv[1], ['op', 'status'], ctx)\n"
              "sink.write({'op': 'a', 'status': 'ok'}); sink.write({'op': 'b', 'status': 'ok'})\n"
              + BLOCK.format(marker=str(marker), fifo=str(fifo)))
    code = _run_and_kill_at_marker([sys.executable, "-c", script, str(tmp_path / "k.csv")],
                                   tmp_path / "k.log", marker)
    assert code == -9
    assert [(r["op"], r["status"]) for r in read(tmp_path / "k.csv")[1]] == [("a", "ok"), ("b", "ok")]
    for module in ("train", "kernels", "nf4_matmul", "max_context_step"):
        assert "common.CsvSink(" in (REPO / "bench" / f"{module}.py").read_text(), module


# ------------------------------------------------------------------ an honest headline
GPU_NAME = "NVIDIA H200"
CPU_NAME = "cpu (x86_64, 2 cores, Triton interpreter)"
SFT = "training (SFT)"
HF = "transformers+PEFT+bitsandbytes (SDPA)"
RATIO = f"anita / {HF}"


def train_row(framework, **changes):
    row = {c: "" for c in common.META_COLUMNS + train.COLUMNS}
    row.update(bench="train", label=common.GPU_LABEL, device=GPU_NAME, dtype="bf16",
               timestamp="2026-12-02T10:00:00+00:00", command="python -m bench.train",
               measurement="throughput", framework=framework, model="llama3-8b random NF4 (32 "
               "layers)", layers="32", seq_len="2048", batch="4", tokens_per_step="8192",
               status="ok", step_ms="1000", tokens_per_s="8192" if framework == "anita" else "4096",
               lora_r="32", loss_first="12.26", loss_bound="0.0055", loss_check="ok: finite",
               grad_finite="yes", grad_nonzero="yes: 224/224 B, 224/224 A", grad_norm="1.5")
    row.update(changes)
    return row


def headline_of(out: Path, rows, device=None):
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train_anita.csv", [r for r in rows if r["framework"] == "anita"]),
                       ("train_peers.csv", [r for r in rows if r["framework"] != "anita"])):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=common.META_COLUMNS + train.COLUMNS)
            writer.writeheader()
            writer.writerows(part)
    if device is not None:
        (out / "device.json").write_text(json.dumps(device))
    assert headline.main([str(out)]) == 0
    table = {(r["section"], r["provider"]): r for r in read(out / "headline.csv")[1]}
    return table, (out / "headline.txt").read_text()


CPU_DEVICE = {"cuda_device": False, "device": "cpu (x86_64, 2 cores)"}
GPU_DEVICE = {"cuda_device": True, "device": GPU_NAME}


@pytest.mark.parametrize("row_device,row_label,device,label,heading", [
    (CPU_NAME, common.SMOKE_LABEL, CPU_DEVICE, headline.SMOKE_LABEL, headline.SMOKE_LABEL),
    # the folder's device.json says GPU (a stale one): the rows still say where they ran
    (CPU_NAME, common.SMOKE_LABEL, GPU_DEVICE, headline.SMOKE_LABEL, headline.MIXED_LABEL),
    (CPU_NAME, common.SMOKE_LABEL, None, headline.SMOKE_LABEL, headline.MIXED_LABEL),
    (GPU_NAME, common.SMOKE_LABEL, GPU_DEVICE, headline.GPU_SMOKE_LABEL, headline.GPU_SMOKE_LABEL),
    (GPU_NAME, common.GPU_LABEL, GPU_DEVICE, headline.GPU_LABEL, headline.GPU_LABEL)])
def test_each_headline_row_is_labelled_by_the_device_it_was_measured_on(
        tmp_path, row_device, row_label, device, label, heading):
    """The issue's case: `--only headline` over a smoke train CSV from a CPU printed "GPU
    measurement". The label now comes from each row's own device and label, not a flag."""
    rows = [train_row(f, device=row_device, label=row_label) for f in ("anita", "hf_peft_bnb")]
    table, text = headline_of(tmp_path / "out", rows, device)
    for key in ((SFT, "anita"), (SFT, HF), (SFT, RATIO)):
        assert table[key]["label"] == label and table[key]["device"] == row_device, table[key]
    if device is not None:     # a figure without a source row: the session's device.json
        missing = table[("long context", "anita")]
        assert missing["label"] == (headline.SMOKE_LABEL if not device["cuda_device"]
                                    else headline.GPU_LABEL)
    if heading != headline.GPU_SMOKE_LABEL:     # not measured rows say GPU_LABEL there
        assert text.splitlines()[0] == f"== headline ({heading}) =="
    assert (f"== headline ({headline.GPU_LABEL}) ==" in text) == (label == headline.GPU_LABEL)


@pytest.mark.parametrize("column,value", [(None, None), ("seq_len", "1024"), ("batch", "2"),
                                          ("device", "NVIDIA H100 80GB HBM3"), ("layers", "2"),
                                          ("dtype", "fp32")])
def test_a_ratio_is_taken_only_between_rows_of_the_same_device_shapes_and_batch(
        tmp_path, column, value):
    peer = train_row("hf_peft_bnb", **({column: value} if column else {}))
    table, _ = headline_of(tmp_path / "out", [train_row("anita"), peer], GPU_DEVICE)
    ratio = table[(SFT, RATIO)]
    if column is None:
        assert ratio["ratio"] == "2" and ratio["status"] == "ok"
        assert (SFT, "anita / Unsloth (derived)") in table
    else:
        assert ratio["ratio"] == "" and ratio["status"].startswith(
            f"not computed: rows differ in {column} "), ratio
        assert (SFT, "anita / Unsloth (derived)") not in table


@pytest.mark.parametrize("changes,why", [
    (dict(grad_nonzero="no: 0/224 B, 0/224 A", status="check failed: grad_nonzero no"),
     "grad_nonzero no"),
    (dict(grad_finite="no: 3 of 448 gradients hold NaN or inf"), "grad_finite no"),   # status ok
    (dict(grad_finite="", grad_nonzero="", loss_check="", loss_first=""), "grad_finite missing")])
def test_a_framework_whose_step_does_not_train_is_flagged_and_not_ranked(tmp_path, changes, why):
    table, _ = headline_of(tmp_path / "out", [train_row("anita"), train_row("hf_peft_bnb",
                                                                            **changes)], GPU_DEVICE)
    peer = table[(SFT, HF)]
    assert peer["value"] == "" and why in peer["status"], peer
    assert table[(SFT, RATIO)]["ratio"] == "" and table[(SFT, RATIO)]["status"].startswith(
        "not computed")
    assert table[(SFT, "anita")]["value"] == "8192"       # anita's own row still stands


@pytest.mark.parametrize("relative,ranked", [(0.001, True), (0.05, False)])
def test_a_loss_disagreement_is_flagged_and_neither_side_is_ranked(tmp_path, relative, ranked):
    """loss_bound 0.0055: 0.1 % apart agrees, 5 % apart does not."""
    peer = train_row("hf_peft_bnb", loss_first=f"{12.26 * (1 + relative):.9g}")
    table, _ = headline_of(tmp_path / "out", [train_row("anita"), peer], GPU_DEVICE)
    for key in ((SFT, "anita"), (SFT, HF)):
        if ranked:
            assert table[key]["status"] == "ok" and table[key]["value"], table[key]
        else:
            assert table[key]["value"] == "" and "losses disagree: first-step loss" in \
                table[key]["status"] and "> bound 0.0055" in table[key]["status"], table[key]
    assert bool(table[(SFT, RATIO)]["ratio"]) == ranked


# ------------------------------------------------------------------ the device twin
TWIN = REPO / "bench" / "device_twin.sh"
TWIN_VERSIONS = ("torch==2.11.0", "triton==3.6.0", "transformers==5.17.0", "safetensors==0.8.0",
                 "tokenizers==0.23.2", "numpy==2.5.2", "accelerate==1.15.0", "3.12.1")


@pytest.mark.parametrize("flag", ["--plan", "--help"])
def test_the_device_twin_names_the_gpu_machines_versions_and_builds_nothing(tmp_path, flag):
    env = dict(os.environ, HOME=str(tmp_path), TMPDIR=str(tmp_path),
               ANITA_TWIN_VENV=str(tmp_path / "venv"), PATH="/usr/bin:/bin")  # no python3.12 needed
    proc = subprocess.run([str(TWIN), flag], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for version in TWIN_VERSIONS:
        assert version in proc.stdout, version
    for absent in ("datasets", "bitsandbytes", "trl", "lm-eval", "gguf"):
        assert absent in proc.stdout.split("absent", 1)[1].splitlines()[0], absent
    for step in ("bench/gpu_session.sh OUT/session --smoke", "-m tests.sm90_compile",
                 "train_sft.py --output-dir OUT/main_job"):
        assert step in proc.stdout, step
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,word", [(("--fast",), "--fast"), (("a", "b", "c"), "too many")])
def test_the_device_twin_refuses_bad_input_in_one_line(tmp_path, args, word):
    proc = subprocess.run([str(TWIN), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("device_twin.sh: error: ") and word in proc.stderr
    assert list(tmp_path.iterdir()) == []
