"""The headline table of a session: OUT/headline.csv (and headline.txt, printed) from the
CSVs the session's steps wrote.

    python -m bench.headline OUT

One row per figure, each with the device, date, shapes and command of the row it comes
from. Each row is labelled by the device its source row was measured on (the row's own
device and label columns; OUT/device.json for a figure without one), never by a flag:
a GPU measurement only for a non-smoke row from a CUDA device, a CPU smoke value for a
row from the CPU. Where a figure could not be measured (a peer not installed, a step
stopped at its budget) the row says why instead of giving a number.

A ratio is taken only between rows of the same device, dtype, model, layers, sequence
length, batch and LoRA rank (bench/train_checks.py SAME_MEASUREMENT; for kernels the
same device, dtype and shape); rows that differ get no ratio and the row says in what.
A training row is ranked only when its step was checked to train: finite, non-zero LoRA
gradients after the timed steps, and a first-step loss that agrees with the other
framework's within the derived bound (bench/train_checks.py); otherwise its tokens/s
row says which check failed and it enters no ratio. The Unsloth row is not a
measurement: it is Unsloth's published speed-up over transformers + PEFT + bitsandbytes
(UNSLOTH_PUBLISHED) times the transformers + PEFT + bitsandbytes figure measured in this
run, and says so.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench.train_checks import SAME_MEASUREMENT as SAME_MEASUREMENT_KEYS
from bench.train_checks import compare_losses, failed_checks, mismatch

SMOKE_LABEL = "CPU smoke value at smoke sizes - not a GPU number, not performance"
GPU_SMOKE_LABEL = "GPU smoke value at smoke sizes - not performance"
GPU_LABEL = "GPU measurement"
MIXED_LABEL = "rows from more than one kind of run: each row's label says where it was measured"
ROW_GPU_LABEL = "GPU measurement"      # bench.common.GPU_LABEL, what a non-smoke row says
# Unsloth's published figure: "Llama 3.1 (8B) | 80GB | 2x" faster than Hugging Face + FA2
# (QLoRA on all linear layers, rank 32, batch 2, gradient accumulation 4), and 342,733
# tokens of context on an 80 GB card; https://unsloth.ai/blog/llama3-3 (Dec 2024).
UNSLOTH_PUBLISHED = {"speedup": 2.0, "max_context_80gb": 342_733,
                     "source": "https://unsloth.ai/blog/llama3-3"}
COLUMNS = ["section", "metric", "provider", "value", "unit", "relative_to", "ratio", "status",
           "label", "device", "date", "shapes", "command", "source"]


def read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def row_label(src: Optional[dict], device: dict) -> str:
    """What a figure is, from the row it comes from: its device and its own label column
    (a non-smoke row from a CUDA device is a GPU measurement); a figure without a source
    row takes the session's device.json."""
    if src and src.get("device"):
        on_cpu = str(src["device"]).lower().startswith("cpu")
        smoke = src.get("label", "") != ROW_GPU_LABEL
    elif device:
        on_cpu, smoke = not device.get("cuda_device", False), False
    else:
        return "device unknown: no device column and no OUT/device.json"
    if on_cpu:
        return SMOKE_LABEL
    return GPU_SMOKE_LABEL if smoke else GPU_LABEL


class Table:
    def __init__(self, device: dict):
        self.device, self.rows = device, []

    def add(self, section, metric, provider, value=None, unit="", *, src=None, status="",
            relative_to="", ratio=None, shapes="", label=None, source=""):
        src = src or {}
        status = status or (src.get("status", "") if src else "not measured")
        measured = row_label(src, self.device)
        if label and status != "published" and measured not in label:
            label = f"{label}; {measured}"
        self.rows.append({
            "section": section, "metric": metric, "provider": provider,
            "value": "" if value is None else f"{value:.6g}", "unit": unit,
            "relative_to": relative_to, "ratio": "" if ratio is None else f"{ratio:.4g}",
            "status": status, "label": label or measured,
            "device": src.get("device") or self.device.get("device", ""),
            "date": src.get("timestamp") or self.device.get("date", ""),
            "shapes": shapes, "command": src.get("command", ""), "source": source})


KERNEL_KEYS = ("device", "dtype", "shape")


def unmatched(a: Optional[dict], b: Optional[dict], keys: Sequence[str]) -> str:
    """'' when both rows exist and agree on ``keys``; else why no ratio is taken."""
    if not a or not b:
        return "a row is missing"
    differ = mismatch(a, b, keys)
    return f"rows differ in {differ}" if differ else ""


def _missing(step: str) -> str:
    return f"not measured: no row from the {step} step (see OUT/summary.txt and OUT/{step}.log)"


def _ranked(r: Optional[dict]) -> str:
    """'' when row ``r`` may be ranked: measured, and its step checked to train."""
    if r is None:
        return "no row"
    status = r.get("status", "")
    if status != "ok" and not status.startswith("check failed"):
        return status
    problems = failed_checks(r)
    return "; ".join(problems)


def training(t: Table, rows, measurement: str, section: str, step_of: Dict[str, str]) -> None:
    by = {r["framework"]: r for r in rows if r.get("measurement") == measurement}
    names = {"anita": "anita", "hf_peft_bnb": "transformers+PEFT+bitsandbytes (SDPA)",
             "hf_peft_bnb_liger": "transformers+PEFT+bitsandbytes + Liger"}
    anita = by.get("anita")
    # a peer whose first-step loss disagrees with anita's is not ranked; nor is anita when
    # no peer's loss agrees with its own (which side is wrong is not known from here)
    disagree: Dict[str, str] = {}
    agreeing = []
    for other in ("hf_peft_bnb", "hf_peft_bnb_liger"):
        if anita is not None and by.get(other) is not None:
            agree, text = compare_losses(by[other], anita)
            if agree is False:
                disagree[other] = f"losses disagree: {text}"
            agreeing += [other] if agree else []
    if disagree and not agreeing:
        disagree["anita"] = "; ".join(disagree.values())
    rate = {}
    for framework, name in names.items():
        r = by.get(framework)
        shapes = "" if r is None else (f"{r['model']}, seq {r['seq_len']} x batch {r['batch']}, "
                                       f"LoRA r {r['lora_r']} on all 7 projections, {r['dtype']}")
        why = _ranked(r) if r is not None else ""
        if r is not None and not why and framework in disagree:
            why = disagree[framework]
        ok = r is not None and not why
        rate[framework] = _float(r.get("tokens_per_s")) if ok else None
        measured = r is not None and (r.get("status") == "ok" or
                                      r.get("status", "").startswith("check failed"))
        status = "" if r is None else ("ok" if ok else f"not ranked: {why}" if measured else why)
        t.add(section, "tokens/s", name, rate[framework], "tokens/s", src=r,
              status=status or _missing(step_of[framework]), shapes=shapes, source="train CSV")
    for other in ("hf_peft_bnb", "hf_peft_bnb_liger"):
        ok = rate["anita"] and rate[other]
        why = unmatched(anita, by.get(other), SAME_MEASUREMENT_KEYS) if ok else \
            "a tokens/s row above is missing or not ranked"
        t.add(section, "speed-up", f"anita / {names[other]}", None, "x",
              src=anita, relative_to=names[other],
              ratio=rate["anita"] / rate[other] if ok and not why else None,
              status="ok" if ok and not why else f"not computed: {why}")
    hf = rate["hf_peft_bnb"]
    unsloth = UNSLOTH_PUBLISHED["speedup"] * hf if hf else None
    t.add(section, "tokens/s", "Unsloth (derived, not measured)", unsloth, "tokens/s",
          src=by.get("hf_peft_bnb"), status="derived" if hf else "not computed: no ranked "
          "transformers+PEFT+bitsandbytes row", label=(
              f"derived: Unsloth's published {UNSLOTH_PUBLISHED['speedup']:g}x over transformers "
              f"+ PEFT + bitsandbytes x that row of this run; Unsloth itself was not run (it does "
              f"not fit the 64 MiB of wheels)"),
          source=UNSLOTH_PUBLISHED["source"])
    why = unmatched(anita, by.get("hf_peft_bnb"), SAME_MEASUREMENT_KEYS)
    if unsloth and rate["anita"] and not why:
        t.add(section, "speed-up", "anita / Unsloth (derived)", None, "x", src=anita,
              ratio=rate["anita"] / unsloth, status="derived",
              label="derived from the row above, not a measurement of Unsloth",
              source=UNSLOTH_PUBLISHED["source"])
    r = anita
    if r is not None:
        measured, predicted = _float(r.get("peak_mib")), _float(r.get("predicted_peak_mib"))
        t.add("memory", f"peak of the {section} step vs the planner's prediction", "anita",
              measured, "MiB", src=r, relative_to=f"predicted {predicted:.6g} MiB" if predicted else "",
              ratio=measured / predicted if measured and predicted else None,
              status=r["status"] if measured else "no CUDA: torch keeps no peak statistic on a CPU",
              shapes=f"seq {r['seq_len']} x batch {r['batch']}",
              source="train CSV (max_memory_allocated, reset after the warm-up step)")


def max_context(t: Table, rows) -> None:
    r = rows[0] if rows else None
    if r is None:
        t.add("long context", "longest batch-1 sequence, 80 GB cap", "anita",
              status=_missing("max_context"))
        return
    ok = r["status"] == "ok"
    t.add("long context", "batch-1 sequence trained one step under the cap", "anita",
          _float(r["tried_seq"]) if ok else None, "tokens", src=r,
          relative_to=f"planner's predicted maximum {r['predicted_max_seq']}",
          shapes=f"{r['model']}, {r['layers']} layers, plan {r['strategies']}; limited by "
                 f"{r['limited_by']}", source="max_context CSV")
    t.add("long context", "peak of that step vs the planner's prediction", "anita",
          _float(r.get("peak_mib")), "MiB", src=r, relative_to=f"predicted {r['predicted_peak_mib']} MiB",
          ratio=_float(r.get("peak_vs_predicted")),
          status=r["status"] if r.get("peak_mib") else f"{r['status']}; no peak statistic on a CPU")
    t.add("long context", "Unsloth's published maximum, 80 GB (not measured here)", "Unsloth",
          UNSLOTH_PUBLISHED["max_context_80gb"], "tokens", status="published",
          label="published figure, not a measurement", source=UNSLOTH_PUBLISHED["source"])


def kernels(t: Table, rows) -> None:
    if not rows:
        t.add("kernels", "nf4_dequantize and attention", "", status=_missing("kernels"))
        return
    for r in rows:
        if r["op"] == "nf4_dequantize" and r["mode"] == "forward" and \
                r["provider"] in ("ours", "bitsandbytes", "torch"):
            t.add("nf4_dequantize", "GB/s", r["provider"], _float(r["gbps"]), "GB/s", src=r,
                  relative_to=f"copy {r['ceiling_copy_gbps']} GB/s", ratio=_float(r["frac_copy_bw"]),
                  shapes=f"{r['group']}: {r['shape']}", source="kernels CSV")
        if r["op"] == "flash_attention" and r["mode"] in ("forward", "both"):
            t.add(f"attention {r['mode']}", "TFLOP/s", r["provider"], _float(r["tflops"]),
                  "TFLOP/s", src=r, relative_to=f"{r['dtype']} matmul {r['ceiling_matmul_tflops']} TFLOP/s measured",
                  ratio=_float(r["frac_matmul"]), shapes=r["shape"], source="kernels CSV")
    attention = [r for r in rows if r["op"] == "flash_attention" and r["status"] == "ok"]
    for mode in ("forward", "both"):
        ours = [r for r in attention if r["mode"] == mode and r["provider"] == "ours"]
        for mine in ours:           # a ratio only against rows of the same device, dtype, shape
            sdpa = {r["provider"]: r for r in attention if r["mode"] == mode and
                    r["provider"] in ("sdpa_flash", "sdpa_cudnn") and _float(r["median_ms"])}
            same = {p: r for p, r in sdpa.items() if not unmatched(mine, r, KERNEL_KEYS)}
            if not same or not _float(mine["median_ms"]):
                why = "; ".join(f"{p}: {unmatched(mine, r, KERNEL_KEYS)}" for p, r in sdpa.items())
                t.add(f"attention {mode}", "speed vs the faster SDPA kernel", "ours", src=mine,
                      status=f"not computed: no SDPA row of the same device, dtype and shape"
                             f"{' (' + why + ')' if why else ''}", shapes=mine["shape"],
                      source="kernels CSV")
                continue
            best = min(same, key=lambda p: _float(same[p]["median_ms"]))
            t.add(f"attention {mode}", "speed vs the faster SDPA kernel", f"ours / {best}",
                  src=mine, relative_to=best, shapes=mine["shape"], status="ok",
                  ratio=_float(same[best]["median_ms"]) / _float(mine["median_ms"]),
                  source="kernels CSV (time ratio)")


def nf4_matmul(t: Table, rows) -> None:
    if not rows:
        t.add("nf4_matmul", "paths vs dense cuBLAS", "", status=_missing("nf4_matmul"))
        return
    from bench.crossover import crossover_rows
    for c in crossover_rows(rows):
        src = next((r for r in rows if r["shape"] == c["shape"] and r["mode"] == c["mode"]), None)
        t.add("nf4_matmul", f"crossover {c['mode']}", "ours_fused vs ours_dequant+matmul",
              _float(c["fused wins up to"]), "M (largest where fused wins)", src=src,
              status=f"first M where dequant wins: {c['first M where dequant wins']}",
              shapes=c["shape"], source="nf4_matmul CSV")
    ms = {(r["provider"], r["mode"], r["shape"], int(r["m"])): r for r in rows}
    for (provider, mode, shape, m), r in sorted(ms.items()):
        if provider == "ours" and (m <= 16 or m == max(k[3] for k in ms)):
            peers = [p for p in ("bnb_matmul_4bit", "bnb_dequant+matmul") if (p, mode, shape, m) in ms]
            mine = _float(r["median_ms"])
            for p in peers:
                peer = ms[(p, mode, shape, m)]
                theirs, why = _float(peer["median_ms"]), unmatched(r, peer, KERNEL_KEYS)
                ok = mine and theirs and not why
                t.add("nf4_matmul", f"speed vs {p}, {mode}, M {m}", "ours", None, "x", src=r,
                      relative_to=p, ratio=theirs / mine if ok else None,
                      status="ok" if ok else (f"not computed: {why}" if why else
                                              f"{r['status']} / {peer['status']}"),
                      shapes=shape, source="nf4_matmul CSV")
            t.add("nf4_matmul", f"speed vs dense cuBLAS, {mode}, M {m}", "ours", None, "x", src=r,
                  relative_to="dense_matmul", ratio=_float(r["speedup_vs_dense"]), shapes=shape,
                  source="nf4_matmul CSV")


def gpu_tests(t: Table, rows) -> None:
    if not rows:
        t.add("bf16 parity", "gpu tests", "", status=_missing("gpu_tests"))
        return
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    t.add("bf16 parity", "gpu tests (pytest -m gpu)", "anita", counts.get("passed", 0), "passed",
          status=summary, source="gpu_tests CSV")
    for r in rows:
        if "test_gpu_training" in r["nodeid"] or "small_m" in r["nodeid"]:
            t.add("bf16 parity", r["nodeid"].split("::")[-1], "anita", None, "",
                  status=f"{r['outcome']} {r['message']}".strip(), source="gpu_tests CSV")


def build(out: Path) -> List[dict]:
    try:
        device = json.loads((out / "device.json").read_text())
    except (OSError, ValueError):
        device = {}
    t = Table(device)
    train = read_csv(out / "train_anita.csv") + read_csv(out / "train_peers.csv")
    step_of = {"anita": "train_anita", "hf_peft_bnb": "train_peers", "hf_peft_bnb_liger": "train_peers"}
    training(t, train, "throughput", "training (SFT)", step_of)
    training(t, train, "dpo_step", "training (DPO, policy only)", step_of)
    max_context(t, read_csv(out / "max_context.csv"))
    kernels(t, read_csv(out / "kernels.csv"))
    nf4_matmul(t, read_csv(out / "nf4_matmul.csv"))
    gpu_tests(t, read_csv(out / "gpu_tests.csv"))
    return t.rows


def headline_label(rows: List[dict]) -> str:
    """The table's heading, from its rows' own labels (published figures aside)."""
    kinds = set()
    for r in rows:
        if r["status"] == "published":
            continue
        kinds.add(next((k for k in (SMOKE_LABEL, GPU_SMOKE_LABEL, GPU_LABEL) if k in r["label"]),
                       r["label"]))
    return kinds.pop() if len(kinds) == 1 else MIXED_LABEL


def text_table(rows: List[dict]) -> str:
    heading = headline_label(rows)
    lines = [f"== headline ({heading}) =="]
    for r in rows:
        value = f"{r['value']} {r['unit']}".strip() if r["value"] else ""
        ratio = f"ratio {r['ratio']}" + (f" of {r['relative_to']}" if r["relative_to"] else "") \
            if r["ratio"] else ""
        where = r["label"][:70] if heading == MIXED_LABEL else ""
        lines.append(" | ".join(x for x in (r["section"], r["metric"], r["provider"], value, ratio,
                                              r["status"][:90], where) if x))
    lines.append(f"== end of headline ({len(rows)} rows; device, date, shapes and command of each "
                 "in headline.csv) ==")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the session's folder")
    parser.add_argument("--smoke", action="store_true",
                        help="accepted and ignored: each row is labelled by the device its source "
                             "row was measured on (default: off)")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"argument out: {args.out} is not a folder")
    rows = build(args.out)
    tmp = args.out / ".headline.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(args.out / "headline.csv")
    text = text_table(rows)
    (args.out / "headline.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
