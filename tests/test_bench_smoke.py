"""CI guard for bench/: the three benchmark scripts run end to end in smoke mode
(tiny shapes, Triton interpreter on CPU), write the CSV rows and columns they
promise, label every row and printed table as a smoke run, and never present
a smoke number as performance. Plus the pure helpers (fit search, FLOP count,
--help defaults)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anita_core.model.weights import PROJECTIONS
from bench import common, fit, flops, kernels, nf4_matmul, train
from bench.common import GPU_LABEL, SMOKE_LABEL
from bench.shapes import LLAMA3_8B

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("kernels", "nf4_matmul", "train")

# Providers each op has an adapter for (a row per provider, even when skipped).
KERNEL_PROVIDERS = {
    "nf4_quantize": {"ours", "torch", "torch.compile", "bitsandbytes"},
    "nf4_dequantize": {"ours", "torch", "torch.compile", "bitsandbytes", "unsloth"},
    "nf4_matmul": {"ours", "torch", "torch.compile", "bitsandbytes", "unsloth"},
    "lora_linear": {"ours", "torch", "torch.compile", "bitsandbytes", "unsloth"},
    "rms_norm": {"ours", "torch", "torch.compile", "liger", "unsloth"},
    "rope": {"ours", "torch", "torch.compile", "liger", "unsloth"},
    "swiglu": {"ours", "torch", "torch.compile", "liger", "unsloth"},
    "cross_entropy": {"ours", "torch", "torch.compile", "liger", "unsloth"},
    "fused_linear_cross_entropy": {"ours", "torch", "torch.compile", "liger"},
    "token_logprobs": {"ours", "torch", "torch.compile"},
    "flash_attention": {"ours", "torch", "sdpa_causal", "sdpa_flash", "sdpa_cudnn", "flex_attention",
                        "flash_attn"},
}
NF4_OPS = {"nf4_quantize", "nf4_dequantize", "nf4_matmul", "lora_linear"}
NOT_DIFFERENTIABLE = {"nf4_quantize", "nf4_dequantize"}
SMOKE_GROUPS = 2          # bench.shapes.SMOKE_PROJECTIONS
CHECK_TOLERANCE = 1e-3    # bench.cases.check_tolerance(fp32): providers must agree in fp32
ON_CPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the three scripts' smoke modes side by side (two cores), once per module."""
    out = tmp_path_factory.mktemp("bench_smoke")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    procs = {}
    for name in SCRIPTS:
        cmd = [sys.executable, "-m", f"bench.{name}", "--smoke", "--no-progress",
               "--out", str(out / f"{name}.csv")]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        path = out / f"{name}.csv"
        header, rows = None, []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows, header = list(reader), reader.fieldnames
        results[name] = dict(returncode=proc.returncode, stdout=stdout, stderr=stderr,
                             header=header, rows=rows, dir=out)
    print(f"[bench smoke] three scripts, wall {time.perf_counter() - start:.1f} s")
    return results


def _ok(result):
    assert result["returncode"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    assert result["rows"], "no CSV rows written"


def _positive(row, *columns):
    for c in columns:
        assert float(row[c]) > 0, (c, row)


def _no_errors(rows):
    bad = [(r.get("op"), r.get("provider") or r.get("framework"), r.get("mode"), r["status"])
           for r in rows if r["status"].startswith(("error", "check failed", "oom"))]
    assert not bad, bad


def _peer_ok_or_absent(row, library: str):
    """A peer installed in CI must work; one that is absent must say so."""
    status = row["status"]
    assert status == "ok" or status.startswith(f"skipped: {library} not importable"), row


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_row_and_table_is_labelled_smoke(smoke, name):
    result = smoke[name]
    _ok(result)
    assert all(r["label"] == SMOKE_LABEL for r in result["rows"])
    assert GPU_LABEL not in result["stdout"] and GPU_LABEL not in result["stderr"]
    banners = [line for line in result["stdout"].splitlines() if line.startswith("== ")]
    assert banners, "no printed table"
    assert all(line.startswith(f"== {SMOKE_LABEL} ==") for line in banners), banners
    if ON_CPU:
        assert all("perf_counter" in r["timing_method"] and "interpreter" in r["timing_method"]
                   for r in result["rows"])
        assert all("Triton interpreter" in r["device"] for r in result["rows"])
    for r in result["rows"]:   # provenance on every row
        assert r["timestamp"] and r["torch"] == torch.__version__ and r["triton"] and r["command"]


# ------------------------------------------------------------------ kernels
def test_kernels_csv_rows_and_columns(smoke):
    result = smoke["kernels"]
    _ok(result)
    assert result["header"] == common.META_COLUMNS + kernels.COLUMNS
    rows = result["rows"]
    keys = [(r["op"], r["provider"], r["mode"], r["shape"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate op/provider/mode/shape rows"
    expected = sum(len(providers) * (SMOKE_GROUPS if op in NF4_OPS else 1) * 3
                   for op, providers in KERNEL_PROVIDERS.items())
    assert len(rows) == expected
    for op, providers in KERNEL_PROVIDERS.items():
        assert {r["provider"] for r in rows if r["op"] == op} == providers, op
        assert {r["mode"] for r in rows if r["op"] == op} == {"forward", "backward", "both"}
    _no_errors(rows)
    for r in rows:
        differentiable = r["op"] not in NOT_DIFFERENTIABLE
        if r["mode"] != "forward" and not differentiable:
            assert r["status"].startswith("skipped: the op has no backward"), r
        elif r["provider"] in ("ours", "torch", "sdpa_causal", "sdpa_flash"):
            assert r["status"] == "ok", r
        elif r["provider"] == "torch.compile":
            assert r["status"].startswith("skipped: torch.compile is not run in smoke mode"), r
        elif r["provider"] == "bitsandbytes":
            _peer_ok_or_absent(r, "bitsandbytes")
        elif ON_CPU:   # liger, unsloth
            assert r["status"].startswith("skipped:") and "CUDA" in r["status"], r
        if r["status"] == "ok":
            _positive(r, "median_ms", "bytes", "flops", "gbps", "tflops", "frac_copy_bw",
                      "frac_matmul", "ceiling_copy_gbps", "ceiling_matmul_tflops")
            assert float(r["check_rel_err"]) <= CHECK_TOLERANCE, r


def test_nf4_matmul_csv_rows_and_columns(smoke):
    result = smoke["nf4_matmul"]
    _ok(result)
    assert result["header"] == common.META_COLUMNS + nf4_matmul.COLUMNS
    rows = result["rows"]
    assert len(rows) == SMOKE_GROUPS * len(nf4_matmul.MODES) * len(nf4_matmul.SMOKE_M) \
        * len(nf4_matmul.PROVIDERS)
    assert {int(r["m"]) for r in rows} == set(nf4_matmul.SMOKE_M)
    _no_errors(rows)
    for r in rows:
        provider = r["provider"]
        if provider in ("ours", "ours_fused", "ours_dequant+matmul", "dense_matmul"):
            assert r["status"] == "ok", r
        elif provider == "bnb_matmul_4bit" and r["mode"] == "backward_input":
            assert r["status"].startswith("skipped:"), r
        elif provider.startswith("bnb"):
            _peer_ok_or_absent(r, "bitsandbytes")
        elif ON_CPU:
            assert r["status"].startswith("skipped:") and "CUDA" in r["status"], r
        if r["status"] == "ok":
            _positive(r, "median_ms", "tflops", "gbps", "speedup_vs_dense", "flops", "bytes")
            assert float(r["check_rel_err"]) <= CHECK_TOLERANCE, r


def test_train_csv_rows_and_columns(smoke):
    result = smoke["train"]
    _ok(result)
    assert result["header"] == common.META_COLUMNS + train.COLUMNS
    rows = result["rows"]
    assert [(r["framework"], r["measurement"]) for r in rows] == [
        ("anita", "throughput"), ("anita", "longest_seq_batch1"),
        ("hf_peft_bnb", "throughput"), ("hf_peft_bnb", "longest_seq_batch1"),
        ("hf_peft_bnb_liger", "throughput")]
    _no_errors(rows)
    for r in rows:
        if r["framework"] == "hf_peft_bnb_liger":      # Liger's kernels need a GPU
            if ON_CPU:
                assert r["status"].startswith("skipped: Liger-Kernel runs only on a CUDA GPU"), r
            continue
        if r["framework"] == "hf_peft_bnb" and r["status"] != "ok" \
                and r["measurement"] == "throughput":
            assert r["status"].startswith("skipped: transformers + PEFT + bitsandbytes"), r
            continue
        if r["measurement"] == "throughput":
            assert r["status"] == "ok" and int(r["batch"]) == 1, r
            assert int(r["seq_len"]) == train.SMOKE_SEQS[0]
            _positive(r, "step_ms", "tokens_per_s", "model_tflop_per_step",
                      "achieved_tflops", "mfu_vs_measured_matmul", "lora_params", "frozen_params")
            assert float(r["tokens_per_s"]) == pytest.approx(
                int(r["tokens_per_step"]) / (float(r["step_ms"]) * 1e-3), rel=1e-4)
        else:   # the smoke search runs 8 -> 16 and hits its limit without running out of memory
            assert r["status"].startswith("ok (limit 16 reached"), r
            assert int(r["seq_len"]) == 16 and r["search"] == "8:ok 16:ok", r
    # every timed step trained: finite, non-zero LoRA gradients; first-step losses agree
    timed = [r for r in rows if r["measurement"] == "throughput" and r["status"] == "ok"]
    for r in timed:
        assert r["grad_finite"] == "yes" and r["grad_nonzero"].startswith("yes: 7/7 B"), r
        assert float(r["grad_norm"]) > 0 and float(r["loss_bound"]) > 0, r
    hf = [r for r in timed if r["framework"] == "hf_peft_bnb"]
    for r in hf:    # the same NF4 model and rows as anita's: the same loss before any update
        assert r["loss_check"].startswith("ok: first-step loss ") and "vs anita's" in \
            r["loss_check"], r


def test_plots_written(smoke):
    import matplotlib  # noqa: F401  (the test extra installs it)
    for name in SCRIPTS:
        _ok(smoke[name])
        pngs = list(smoke[name]["dir"].glob(f"{name}*.png"))
        assert pngs, f"no plot for {name}"
        assert all(p.stat().st_size > 10_000 for p in pngs)


# ------------------------------------------------------------------ helpers
def test_largest_that_fits_bisects_to_the_threshold():
    found = fit.largest_that_fits(lambda n: n <= 37, start=1, limit=64)
    assert (found.largest, found.capped) == (37, False)
    assert [n for n, _ in found.tried][:7] == [1, 2, 4, 8, 16, 32, 64]
    assert len(found.tried) <= 7 + 6   # doubling, then a bisection of a gap of 32


def test_largest_that_fits_respects_granularity_cap_and_failure():
    found = fit.largest_that_fits(lambda n: n <= 5000, start=1024, limit=131072, granularity=1024)
    assert found.largest == 4096 and not found.capped
    assert all(n % 1024 == 0 for n, _ in found.tried)
    capped = fit.largest_that_fits(lambda n: True, start=3, limit=20)
    assert (capped.largest, capped.capped) == (20, True)
    assert [n for n, _ in capped.tried] == [3, 6, 12, 20]
    none = fit.largest_that_fits(lambda n: False, start=8, limit=64)
    assert none.largest is None and none.tried == [(8, False)]
    with pytest.raises(ValueError):
        fit.largest_that_fits(lambda n: True, start=10, limit=5)


def test_llama3_8b_parameter_counts_and_step_flops():
    config = LLAMA3_8B.model_config()
    counts = flops.parameter_counts(config, 32, PROJECTIONS)
    # 32 layers x (2 x 4096^2 + 2 x 1024 x 4096 + 3 x 14336 x 4096) + 128256 x 4096
    assert counts.frozen_projections == 6_979_321_856
    assert counts.frozen == 6_979_321_856 + 525_336_576
    # r (in + out) summed over the 7 projections, times 32 layers
    assert counts.lora == 83_886_080
    step = flops.training_step_flops(config, batch=2, seq=2048, lora_r=32,
                                     targets=PROJECTIONS)
    dense = 2 * 2048 * (4 * 7_504_658_432 + 6 * 83_886_080)
    attention = 6 * 2 * 32 * 2048 ** 2 * 32 * 128
    assert step == dense + attention
    assert flops.datasheet_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert flops.datasheet_tflops("some other device") is None


@pytest.mark.parametrize("module", [kernels, nf4_matmul, train])
def test_help_states_every_default(module):
    parser = module.build_parser()
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        assert action.help and "default" in action.help, action.option_strings


@pytest.mark.skipif(not ON_CPU, reason="on a GPU machine this would start a real run")
@pytest.mark.parametrize("module", [kernels, nf4_matmul, train])
def test_performance_run_refused_without_gpu(module):
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        module.main([])


# ------------------------------------------------------------------ training checks
def test_the_loss_bound_is_the_stated_one():
    """bench/train_checks.py: 5.5e-3 at the session's shapes, bf16; fp32 smoke far below."""
    from bench.train_checks import sft_loss_bound
    gpu = sft_loss_bound("bf16", 32, 2048, 4, hidden=4096, intermediate=14336, vocab=128256)
    assert gpu == pytest.approx(5.53e-3, rel=0.01)
    assert sft_loss_bound("fp32", 1, 24, 2, hidden=64, intermediate=192, vocab=301) < 2e-6
    assert sft_loss_bound("bf16", 32, 2048, 1, hidden=4096, intermediate=14336,
                          vocab=128256) == pytest.approx(2 * gpu, rel=1e-3)   # 1 / sqrt(N)


def test_a_step_without_gradients_fails_the_gradient_check():
    from bench.train_checks import grad_check
    a, b = torch.ones(2, 3, requires_grad=True), torch.ones(3, 2, requires_grad=True)
    named = [("x.lora_A.weight", a), ("x.lora_B.weight", b)]
    none = grad_check(named, first_step=False)
    assert none["grad_finite"].startswith("no:") and none["grad_nonzero"].startswith("no:")
    a.grad, b.grad = torch.zeros(2, 3), torch.ones(3, 2)
    assert grad_check(named, first_step=True)["grad_nonzero"].startswith("yes")   # dA = 0 at B = 0
    assert grad_check(named, first_step=False)["grad_nonzero"].startswith("no: 1/1 B, 0/1 A")
    a.grad = torch.full((2, 3), float("nan"))
    assert grad_check(named, first_step=False)["grad_finite"].startswith("no: 1 of 2")


def planted(kind: str):
    """A tiny pure-torch framework for bench.train: embedding, one LoRA pair, lm_head, the
    same base weights for every kind. "trains": a real step; "zero_grads": back-propagates
    zero (its step silently does nothing); "wrong_loss": trains, reports twice the loss."""
    from bench.train_models import Trainable

    def build(config, lora, *, dtype, device, seed=0, **_):
        g = torch.Generator().manual_seed(seed)
        v, h = config.vocab_size, 16
        embed, head = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g) * h ** -0.5
        a = torch.zeros(lora.r, h, requires_grad=True)
        b = torch.zeros(h, lora.r, requires_grad=True)
        state = {}

        def reset():
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)
                b.zero_()
            a.grad = b.grad = None
            state["optimizer"] = torch.optim.AdamW([a, b], lr=1e-2)

        def step(ids):
            state["optimizer"].zero_grad(set_to_none=True)
            x = embed[ids]
            logits = (x + (x @ a.T) @ b.T) @ head.T
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v),
                                                     ids[:, 1:].reshape(-1))
            (loss * (0.0 if kind == "zero_grads" else 1.0)).backward()
            state["optimizer"].step()
            return loss.detach() * (2.0 if kind == "wrong_loss" else 1.0)
        reset()
        return Trainable(kind, config, step, a.numel() + b.numel(), lambda: None,
                         lora_named_parameters=lambda: [("lora_A", a), ("lora_B", b)], reset=reset)
    return build


def test_planted_frameworks_that_do_not_train_are_flagged_and_not_ranked(tmp_path, monkeypatch,
                                                                          capsys):
    """anita's place taken by a framework that trains, the peers' by one whose step does
    nothing (zero gradients) and one whose loss disagrees: both flagged in their rows, the
    run exits 1, and the headline ranks neither."""
    import json
    from bench import headline, train_models
    monkeypatch.setattr(train_models, "BUILDERS", {
        "anita": planted("trains"), "hf_peft_bnb": planted("zero_grads"),
        "hf_peft_bnb_liger": planted("wrong_loss")})
    monkeypatch.setattr(train, "BUILDERS", train_models.BUILDERS)
    out = tmp_path / "out"
    code = train.main(["--smoke", "--batch", "2", "--steps", "2", "--objectives", "sft",
                       "--no-max-seq", "--no-plot", "--no-progress",
                       "--out", str(out / "train_anita.csv")])
    assert code == 1
    with open(out / "train_anita.csv", newline="", encoding="utf-8") as f:
        rows = {r["framework"]: r for r in csv.DictReader(f)}
    good, lazy, wrong = rows["anita"], rows["hf_peft_bnb"], rows["hf_peft_bnb_liger"]
    assert good["status"] == "ok" and good["grad_nonzero"] == "yes: 1/1 B, 1/1 A", good
    assert lazy["status"].startswith("check failed: grad_nonzero no: 0/1 B, 0/1 A"), lazy
    assert lazy["loss_check"].startswith("ok: first-step loss"), lazy   # its loss is right
    assert wrong["grad_nonzero"].startswith("yes") and wrong["status"].startswith(
        "check failed: loss_check failed: first-step loss"), wrong
    assert float(wrong["loss_first"]) == pytest.approx(2 * float(good["loss_first"]), rel=1e-6)
    (out / "device.json").write_text(json.dumps({"cuda_device": False, "device": "cpu"}))
    assert headline.main([str(out)]) == 0
    with open(out / "headline.csv", newline="", encoding="utf-8") as f:
        table = {(r["section"], r["provider"]): r for r in csv.DictReader(f)}
    sft = "training (SFT)"
    assert table[(sft, "anita")]["value"] and table[(sft, "anita")]["status"] == "ok"
    for peer, why in (("transformers+PEFT+bitsandbytes (SDPA)", "not ranked: grad_nonzero no"),
                      ("transformers+PEFT+bitsandbytes + Liger", "not ranked: loss_check failed")):
        assert table[(sft, peer)]["value"] == "" and table[(sft, peer)]["status"].startswith(why)
        assert table[(sft, f"anita / {peer}")]["ratio"] == ""
