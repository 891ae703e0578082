"""The headline table of a session: OUT/headline.csv (and headline.txt, printed) from the
CSVs the session's steps wrote.

    python -m bench.headline OUT [--smoke]

One row per figure, each with the device, date, shapes and command of the row it comes
from. Where a figure could not be measured (a peer not installed, a step stopped at its
budget, a smoke run without CUDA) the row says why instead of giving a number. In a
smoke run every row is labelled as a CPU smoke value at smoke sizes, never as a GPU
number. The Unsloth row is not a measurement: it is Unsloth's published speed-up over
transformers + PEFT + bitsandbytes (UNSLOTH_PUBLISHED) times the transformers + PEFT +
bitsandbytes figure measured in this run, and says so.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

SMOKE_LABEL = "CPU smoke value at smoke sizes - not a GPU number, not performance"
GPU_LABEL = "GPU measurement"
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


class Table:
    def __init__(self, smoke: bool, device: dict):
        self.smoke, self.device, self.rows = smoke, device, []

    def add(self, section, metric, provider, value=None, unit="", *, src=None, status="",
            relative_to="", ratio=None, shapes="", label=None, source=""):
        src = src or {}
        status = status or (src.get("status", "") if src else "not measured")
        if label and self.smoke and SMOKE_LABEL not in label and status != "published":
            label = f"{label}; {SMOKE_LABEL}"
        self.rows.append({
            "section": section, "metric": metric, "provider": provider,
            "value": "" if value is None else f"{value:.6g}", "unit": unit,
            "relative_to": relative_to, "ratio": "" if ratio is None else f"{ratio:.4g}",
            "status": status, "label": label or (SMOKE_LABEL if self.smoke else GPU_LABEL),
            "device": src.get("device") or self.device.get("device", ""),
            "date": src.get("timestamp") or self.device.get("date", ""),
            "shapes": shapes, "command": src.get("command", ""), "source": source})


def _missing(step: str) -> str:
    return f"not measured: no row from the {step} step (see OUT/summary.txt and OUT/{step}.log)"


def training(t: Table, rows, measurement: str, section: str, step_of: Dict[str, str]) -> None:
    by = {r["framework"]: r for r in rows if r.get("measurement") == measurement}
    names = {"anita": "anita", "hf_peft_bnb": "transformers+PEFT+bitsandbytes (SDPA)",
             "hf_peft_bnb_liger": "transformers+PEFT+bitsandbytes + Liger"}
    rate = {}
    for framework, name in names.items():
        r = by.get(framework)
        shapes = "" if r is None else (f"{r['model']}, seq {r['seq_len']} x batch {r['batch']}, "
                                       f"LoRA r {r['lora_r']} on all 7 projections, {r['dtype']}")
        value = _float(r.get("tokens_per_s")) if r and r.get("status") == "ok" else None
        rate[framework] = value
        t.add(section, "tokens/s", name, value, "tokens/s", src=r,
              status="" if r else _missing(step_of[framework]), shapes=shapes, source="train CSV")
    for other in ("hf_peft_bnb", "hf_peft_bnb_liger"):
        ok = rate["anita"] and rate[other]
        t.add(section, "speed-up", f"anita / {names[other]}", None, "x",
              src=by.get("anita"), relative_to=names[other],
              ratio=rate["anita"] / rate[other] if ok else None,
              status="ok" if ok else "not computed: a tokens/s row above is missing")
    hf = rate["hf_peft_bnb"]
    unsloth = UNSLOTH_PUBLISHED["speedup"] * hf if hf else None
    t.add(section, "tokens/s", "Unsloth (derived, not measured)", unsloth, "tokens/s",
          src=by.get("hf_peft_bnb"), status="derived" if hf else "not computed: no "
          "transformers+PEFT+bitsandbytes row", label=(
              f"derived: Unsloth's published {UNSLOTH_PUBLISHED['speedup']:g}x over transformers "
              f"+ PEFT + bitsandbytes x that row of this run; Unsloth itself was not run (it does "
              f"not fit the 64 MiB of wheels)"),
          source=UNSLOTH_PUBLISHED["source"])
    if unsloth and rate["anita"]:
        t.add(section, "speed-up", "anita / Unsloth (derived)", None, "x", src=by.get("anita"),
              ratio=rate["anita"] / unsloth, status="derived",
              label="derived from the row above, not a measurement of Unsloth",
              source=UNSLOTH_PUBLISHED["source"])
    r = by.get("anita")
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
    for mode in ("forward", "both"):
        times = {r["provider"]: _float(r["median_ms"]) for r in rows
                 if r["op"] == "flash_attention" and r["mode"] == mode and r["status"] == "ok"}
        sdpa = {p: v for p, v in times.items() if p in ("sdpa_flash", "sdpa_cudnn") and v}
        if times.get("ours") and sdpa:
            best = min(sdpa, key=sdpa.get)
            t.add(f"attention {mode}", "speed vs the faster SDPA kernel", f"ours / {best}",
                  relative_to=best, ratio=sdpa[best] / times["ours"], status="ok",
                  source="kernels CSV (time ratio)")


def nf4_matmul(t: Table, rows) -> None:
    if not rows:
        t.add("nf4_matmul", "paths vs dense cuBLAS", "", status=_missing("nf4_matmul"))
        return
    from bench.crossover import crossover_rows
    for c in crossover_rows(rows):
        t.add("nf4_matmul", f"crossover {c['mode']}", "ours_fused vs ours_dequant+matmul",
              _float(c["fused wins up to"]), "M (largest where fused wins)",
              status=f"first M where dequant wins: {c['first M where dequant wins']}",
              shapes=c["shape"], source="nf4_matmul CSV")
    ms = {(r["provider"], r["mode"], r["shape"], int(r["m"])): r for r in rows}
    for (provider, mode, shape, m), r in sorted(ms.items()):
        if provider == "ours" and (m <= 16 or m == max(k[3] for k in ms)):
            peers = [p for p in ("bnb_matmul_4bit", "bnb_dequant+matmul") if (p, mode, shape, m) in ms]
            mine = _float(r["median_ms"])
            for p in peers:
                theirs = _float(ms[(p, mode, shape, m)]["median_ms"])
                t.add("nf4_matmul", f"speed vs {p}, {mode}, M {m}", "ours", None, "x", src=r,
                      relative_to=p, ratio=theirs / mine if mine and theirs else None,
                      status="ok" if mine and theirs else f"{r['status']} / "
                      f"{ms[(p, mode, shape, m)]['status']}", shapes=shape, source="nf4_matmul CSV")
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


def build(out: Path, smoke: bool) -> List[dict]:
    try:
        device = json.loads((out / "device.json").read_text())
    except (OSError, ValueError):
        device = {}
    t = Table(smoke, device)
    train = read_csv(out / "train_anita.csv") + read_csv(out / "train_peers.csv")
    step_of = {"anita": "train_anita", "hf_peft_bnb": "train_peers", "hf_peft_bnb_liger": "train_peers"}
    training(t, train, "throughput", "training (SFT)", step_of)
    training(t, train, "dpo_step", "training (DPO, policy only)", step_of)
    max_context(t, read_csv(out / "max_context.csv"))
    kernels(t, read_csv(out / "kernels.csv"))
    nf4_matmul(t, read_csv(out / "nf4_matmul.csv"))
    gpu_tests(t, read_csv(out / "gpu_tests.csv"))
    return t.rows


def text_table(rows: List[dict], smoke: bool) -> str:
    head = f"== headline ({SMOKE_LABEL if smoke else GPU_LABEL}) =="
    lines = [head]
    for r in rows:
        value = f"{r['value']} {r['unit']}".strip() if r["value"] else ""
        ratio = f"ratio {r['ratio']}" + (f" of {r['relative_to']}" if r["relative_to"] else "") \
            if r["ratio"] else ""
        lines.append(" | ".join(x for x in (r["section"], r["metric"], r["provider"], value, ratio,
                                              r["status"][:90]) if x))
    lines.append(f"== end of headline ({len(rows)} rows; device, date, shapes and command of each "
                 "in headline.csv) ==")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the session's folder")
    parser.add_argument("--smoke", action="store_true", help="label every row as a CPU smoke value")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"argument out: {args.out} is not a folder")
    rows = build(args.out, args.smoke)
    tmp = args.out / ".headline.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(args.out / "headline.csv")
    text = text_table(rows, args.smoke)
    (args.out / "headline.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
