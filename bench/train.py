"""QLoRA training throughput on a LLaMA-3-8B-shaped model: anita against
transformers + PEFT + bitsandbytes (SDPA attention, gradient checkpointing),
same shapes, same LoRA (r 32 on all seven projections), same optimizer.

    python -m bench.train                               # random NF4 weights, no download
    python -m bench.train --checkpoint /models/Meta-Llama-3-8B
    python -m bench.train --frameworks anita --seq-lens 2048 --batch 4
    python -m bench.train --smoke                       # CPU check that the harness runs
    python -m bench.train --objectives sft,dpo --batch 4 --no-max-seq   # as gpu_session.sh

For each framework and sequence length: the largest batch that fits (doubling
from 1, then bisecting, up to --max-batch; or --batch), then --warmup-steps
untimed and --steps timed training steps (forward, backward, AdamW step).
Reported: median step time, tokens/s, model FLOP utilization (formula in
bench/flops.py), peak GPU memory (the statistic reset after the warm-up steps)
and, for anita, the memory planner's predicted peak for that step. With
--objectives dpo also one DPO step per timing (policy only: the reference
log-probs of the same rows are computed once before, untimed), on batch / 2
chosen + batch / 2 rejected rows. Then the longest sequence that fits at
batch 1 (one step per try, doubling then bisecting to --max-seq-granularity).
Every framework trains on the same token rows (drawn from --seed, the batch and
the sequence length), every row a full sequence: nothing is padded.

Every timed step is checked to train (bench/train_checks.py): each measurement starts
from the LoRA init (B = 0) and a fresh optimizer; its first step's loss (loss_first,
the loss before any update) must be finite and, for SFT, agree with another
framework's row of the same measurement (earlier in this run, or in --loss-reference)
within the derived bound loss_bound; after the timed steps (outside the timed loop)
the LoRA gradients of the last step must be finite and non-zero (grad_finite,
grad_nonzero). A row whose check fails says "check failed: ..." and the run exits 1.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `import bench` work like python -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from anita_core.lora import LoRAConfig  # noqa: E402
from anita_core.model.weights import PROJECTIONS  # noqa: E402
from bench import common, flops, plot, train_checks  # noqa: E402
from bench.cases import Unavailable  # noqa: E402
from bench.fit import largest_that_fits  # noqa: E402
from bench.shapes import GPU_DIMS, family_dims, parse_int_list  # noqa: E402
from bench.train_models import BUILDERS  # noqa: E402

GPU_SEQS = (512, 1024, 2048, 4096, 8192)
SMOKE_SEQS = (24,)
TIMING = "time.perf_counter around each step after torch.cuda.synchronize; median of --steps"
SMOKE_TIMING = "time.perf_counter around each step; Triton interpreter on CPU"

COLUMNS = ["measurement", "framework", "model", "layers", "seq_len", "batch", "tokens_per_step",
           "status", "step_ms", "step_ms_min", "tokens_per_s", "model_tflop_per_step",
           "achieved_tflops", "mfu_vs_measured_matmul", "mfu_vs_datasheet", "peak_mib",
           "reserved_mib", "predicted_peak_mib", "peak_vs_predicted", "loss", "lora_r",
           "lora_params", "frozen_params", "search", "ceiling_matmul_tflops", "datasheet_tflops",
           *train_checks.CHECK_COLUMNS]
OBJECTIVES = ("sft", "dpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, kernel_timing=False)
    parser.add_argument("--frameworks", default=",".join(BUILDERS),
                        help=f"comma-separated (default: {','.join(BUILDERS)})")
    parser.add_argument("--objectives", default="sft",
                        help="comma-separated from sft, dpo: an SFT step, and/or a DPO step "
                             "(policy only, reference precomputed) on the same rows "
                             "(default: sft)")
    common.add_model_arguments(parser, smoke_layers=1)
    parser.add_argument("--seq-lens", type=parse_int_list, default=None,
                        help=f"comma-separated sequence lengths (default: "
                             f"{','.join(map(str, GPU_SEQS))}; smoke: "
                             f"{','.join(map(str, SMOKE_SEQS))})")
    parser.add_argument("--batch", type=int, default=0,
                        help="batch size; 0 = the largest that fits up to --max-batch (default: 0)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="upper bound of the batch search (default: 64; smoke: 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (default: 5; smoke: 1)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed steps before timing (default: 2; smoke: 0, the batch "
                             "search's step already ran that shape)")
    parser.add_argument("--family", default="llama", choices=tuple(GPU_DIMS),
                        help="model family and size: llama (LLaMA-3-8B, default), mistral "
                             "(Mistral-7B, window 4096), qwen2 (Qwen2.5-7B, q/k/v bias), qwen3 "
                             "(Qwen3-8B, q/k norms); random NF4 weights at those shapes (--smoke: "
                             "a tiny model with the same family features)")
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank (default: 32)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout (default: 0.0)")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="single-level NF4 for both frameworks (default: double quantization)")
    parser.add_argument("--no-max-seq", action="store_true",
                        help="skip the longest-sequence search (default: run it)")
    parser.add_argument("--max-seq-start", type=int, default=None,
                        help="first length the search tries (default: 1024; smoke: 8)")
    parser.add_argument("--max-seq-limit", type=int, default=None,
                        help="longest length tried (default: 131072; smoke: 16)")
    parser.add_argument("--max-seq-granularity", type=int, default=None,
                        help="bisection stops at this resolution (default: 1024; smoke: 8)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write the PNG plot (default: written when matplotlib is "
                             "installed)")
    parser.add_argument("--loss-reference", type=Path, default=None, metavar="CSV",
                        help="another bench/train.py CSV whose rows of the same measurements "
                             "the first-step losses are compared with, e.g. anita's rows when "
                             "the peers run in a process of their own (default: none; the "
                             "rows of this run are compared with each other)")
    parser.add_argument("--datasheet-tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s for mfu_vs_datasheet (default: looked up "
                             "from the device name in bench/flops.py, empty if unknown)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _defaults(args, smoke: bool) -> argparse.Namespace:
    def pick(value, gpu, smoke_value):
        return value if value is not None else (smoke_value if smoke else gpu)
    args.layers = pick(args.layers, GPU_DIMS[args.family].layers, 1)
    args.seq_lens = sorted(set(pick(args.seq_lens, GPU_SEQS, SMOKE_SEQS)))
    args.max_batch = pick(args.max_batch, 64, 1)
    args.steps = pick(args.steps, 5, 1)
    args.warmup_steps = pick(args.warmup_steps, 2, 0)
    args.max_seq_start = pick(args.max_seq_start, 1024, 8)
    args.max_seq_limit = pick(args.max_seq_limit, 131072, 16)
    args.max_seq_granularity = pick(args.max_seq_granularity, 1024, 8)
    return args


class Runner:
    """One framework's model plus the three things done with it."""

    def __init__(self, trainable, ctx, seed: int):
        self.trainable, self.ctx, self.seed = trainable, ctx, seed

    def batch_of(self, batch: int, seq: int) -> torch.Tensor:
        """The same rows for every framework: drawn on the CPU from (seed, batch, seq)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch * 65_537 + seq)
        return torch.randint(0, self.trainable.config.vocab_size, (batch, seq),
                             generator=generator).to(self.ctx.device)

    def fits(self, batch: int, seq: int) -> bool:
        """One training step at this shape: False on out-of-memory."""
        ids = self.batch_of(batch, seq)
        failed = False
        try:
            self.trainable.step(ids)
            common.synchronize(self.ctx.device)
        except Exception as err:  # noqa: BLE001
            if not common.is_out_of_memory(err):
                raise
            failed = True
        del ids
        common.release_memory(self.ctx.device, collect=failed)
        return not failed

    def throughput(self, batch: int, seq: int, warmup: int, steps: int,
                   objective: str = "sft") -> dict:
        """Time ``steps`` steps after ``warmup`` untimed ones, from the LoRA init and a
        fresh optimizer; the peak statistic is reset after the warm-up (the optimizer
        state exists by then, as in the prediction). The first step's loss and, after
        the timed loop, the last step's LoRA gradients are read for the checks."""
        self.trainable.reset()
        ids = self.batch_of(batch, seq)
        if objective == "dpo":
            pairs = max(1, batch // 2)
            rejected = self.batch_of(pairs, seq + 1)[:, :seq]     # other rows, same shape
            dpo_step = self.trainable.dpo(ids[:pairs], rejected)
            step = lambda _ids: dpo_step()      # noqa: E731
        else:
            step = self.trainable.step
        first = None
        for _ in range(warmup):
            loss = step(ids)
            first = loss if first is None else first
        device = self.ctx.device
        common.synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, loss = [], None
        for _ in range(steps):
            common.synchronize(device)
            start = time.perf_counter()
            loss = step(ids)
            common.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
            first = loss if first is None else first
        result = {"step_ms": statistics.median(times), "step_ms_min": min(times),
                  "loss": float(loss),
                  "loss_first": f"{float(first):.9g}"}    # 9 digits: compared to ~1e-6
        if device.type == "cuda":
            result["peak_mib"] = torch.cuda.max_memory_allocated(device) / common.MIB
            result["reserved_mib"] = torch.cuda.max_memory_reserved(device) / common.MIB
        # after the timing and the peak: the last step's LoRA gradients, read once
        result.update(train_checks.grad_check(self.trainable.lora_named_parameters(),
                                              first_step=warmup + steps == 1))
        return result


def _search_text(fit) -> str:
    return " ".join(f"{n}:{'ok' if ok else 'oom'}" for n, ok in fit.tried)


def run(args: argparse.Namespace) -> int:
    ctx = common.make_context("train", args)
    args = _defaults(args, ctx.smoke)
    ctx.meta["timing_method"] = SMOKE_TIMING if not ctx.on_gpu else TIMING
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown framework(s) {unknown}; choose from {list(BUILDERS)}")
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not objectives or any(o not in OBJECTIVES for o in objectives):
        raise SystemExit(f"--objectives {args.objectives!r}: choose from {', '.join(OBJECTIVES)}")
    dims = family_dims(args.family, ctx.smoke)
    config = dims.model_config(layers=args.layers)
    model_name = str(args.checkpoint) if args.checkpoint else f"{dims.name} random NF4 ({args.layers} layers)"
    lora = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=PROJECTIONS)
    ceilings = common.measure_ceilings(ctx)
    datasheet = args.datasheet_tflops or flops.datasheet_tflops(ctx.meta["device"])
    print(f"[{ctx.label}] device: {ctx.meta['device']}; model: {model_name}; measured matmul "
          f"ceiling {ceilings.matmul_tflops:.1f} TFLOP/s; datasheet: {datasheet or 'unknown'}")

    out = args.out or common.default_out_path(ctx)
    sink = common.CsvSink(out, COLUMNS, ctx)
    searches = 0 if args.no_max_seq else 1
    per_framework = len(args.seq_lens) * len(objectives) + searches
    bar = common.progress(None, total=len(frameworks) * per_framework,
                          desc=f"train [{ctx.label}]", ctx=ctx)
    for framework in frameworks:
        base = {"framework": framework, "model": model_name, "lora_r": args.lora_r}
        try:
            trainable = BUILDERS[framework](config, lora, dtype=ctx.dtype, device=ctx.device,
                                            checkpoint=args.checkpoint, blocksize=dims.blocksize,
                                            double_quant=not args.no_double_quant, seed=args.seed)
        except Unavailable as why:
            for objective in objectives:
                for seq in args.seq_lens:
                    sink.write(dict(base, measurement=MEASUREMENT[objective], seq_len=seq,
                                    status=f"skipped: {why}"))
            bar.update(per_framework)
            continue
        model_config = trainable.config
        counts = flops.parameter_counts(model_config, args.lora_r, PROJECTIONS)
        base.update(layers=model_config.num_hidden_layers, lora_params=trainable.lora_parameters,
                    frozen_params=counts.frozen, ceiling_matmul_tflops=ceilings.matmul_tflops,
                    datasheet_tflops=datasheet)
        runner = Runner(trainable, ctx, args.seed)
        for objective in objectives:
            for seq in args.seq_lens:
                row = dict(base, **_throughput_row(runner, seq, args, model_config, ceilings,
                                                   datasheet, objective))
                # the reference CSV is read again for each row: it may be written meanwhile
                sink.write(_checked(row, ctx, _read_rows(args.loss_reference) + sink.rows))
                bar.update(1)
        if not args.no_max_seq:
            sink.write(dict(base, **_longest_row(runner, args)))
            bar.update(1)
        trainable.release()
        del runner, trainable
        common.release_memory(ctx.device, collect=True)
    bar.close()
    sink.close()
    _report(sink.rows, ctx, out)
    if not args.no_plot:
        plot.plot_or_note(out)
    failures = [r for r in sink.rows if (r["framework"] == "anita" and str(r["status"])
                                         .startswith("error")) or
                str(r["status"]).startswith("check failed")]
    return 1 if failures else 0


def _read_rows(path) -> list:
    """The rows of --loss-reference; none when it is not given or not there (yet): the
    row's loss_check then says it had nothing to compare with."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, TypeError):
        return []


def _checked(row: dict, ctx, references: list) -> dict:
    """``row`` with its loss_check, and status "check failed: ..." when a check fails."""
    if row.get("status") != "ok":
        return row
    full = {k: common._cell(v) for k, v in dict(ctx.meta, **row).items()}
    row["loss_check"] = train_checks.own_loss_check(full, references)
    problems = train_checks.failed_checks(dict(full, loss_check=row["loss_check"]))
    if problems:
        row["status"] = "check failed: " + "; ".join(problems)
    return row


MEASUREMENT = {"sft": "throughput", "dpo": "dpo_step"}


def _throughput_row(runner: Runner, seq: int, args, config, ceilings, datasheet,
                    objective: str = "sft") -> dict:
    row = {"measurement": MEASUREMENT[objective], "seq_len": seq}
    try:
        batch = args.batch
        if not batch:
            fit = largest_that_fits(lambda b: runner.fits(b, seq), 1, args.max_batch)
            row["search"] = _search_text(fit)
            if fit.largest is None:
                return dict(row, status="oom at batch 1")
            batch = fit.largest
        if objective == "dpo":
            batch = 2 * max(1, batch // 2)          # chosen + rejected rows
        row.update(batch=batch, tokens_per_step=batch * seq)
        row.update(runner.throughput(batch, seq, args.warmup_steps, args.steps, objective))
        if runner.trainable.predicted_peak is not None:
            predicted = runner.trainable.predicted_peak(batch, seq) / common.MIB
            row["predicted_peak_mib"] = predicted
            if row.get("peak_mib"):
                row["peak_vs_predicted"] = row["peak_mib"] / predicted
    except Unavailable as why:
        return dict(row, status=f"skipped: {why}")
    except Exception as err:  # noqa: BLE001
        status = "oom" if common.is_out_of_memory(err) else common.describe_error(err)
        common.release_memory(runner.ctx.device, collect=True)
        return dict(row, status=status)
    if objective == "sft":
        row["loss_bound"] = train_checks.sft_loss_bound(
            runner.ctx.meta["dtype"], config.num_hidden_layers, seq, batch,
            hidden=config.hidden_size, intermediate=config.intermediate_size,
            vocab=config.vocab_size)
    step_flops = flops.training_step_flops(config, batch, seq, args.lora_r, PROJECTIONS)
    achieved = common.rate(step_flops, row["step_ms"], 1e12)
    row.update(status="ok", tokens_per_s=batch * seq / (row["step_ms"] * 1e-3),
               model_tflop_per_step=step_flops / 1e12, achieved_tflops=achieved,
               mfu_vs_measured_matmul=achieved / ceilings.matmul_tflops,
               mfu_vs_datasheet=achieved / datasheet if datasheet else None)
    return row


def _longest_row(runner: Runner, args) -> dict:
    row = {"measurement": "longest_seq_batch1", "batch": 1}
    try:
        fit = largest_that_fits(lambda s: runner.fits(1, s), args.max_seq_start,
                                args.max_seq_limit, args.max_seq_granularity)
    except Exception as err:  # noqa: BLE001
        common.release_memory(runner.ctx.device, collect=True)
        return dict(row, status=common.describe_error(err))
    row["search"] = _search_text(fit)
    if fit.largest is None:
        return dict(row, status=f"oom already at {args.max_seq_start}")
    status = f"ok (limit {args.max_seq_limit} reached, no OOM)" if fit.capped else "ok"
    return dict(row, seq_len=fit.largest, tokens_per_step=fit.largest, status=status)


def _report(rows, ctx, out) -> None:
    def fmt(v, d=4):
        return "" if v in ("", None) else f"{float(v):.{d}g}"
    table = [{"framework": r["framework"], "measurement": r["measurement"], "seq": r["seq_len"],
              "batch": r["batch"], "status": str(r["status"])[:60], "step ms": fmt(r["step_ms"]),
              "tokens/s": fmt(r["tokens_per_s"]), "MFU(meas.)": fmt(r["mfu_vs_measured_matmul"], 3),
              "MFU(datasheet)": fmt(r["mfu_vs_datasheet"], 3), "peak MiB": fmt(r["peak_mib"], 6),
              "predicted MiB": fmt(r["predicted_peak_mib"], 6),
              "search": r["search"]} for r in rows]
    notes = ["MFU = (tokens (4 N_frozen + 6 N_lora) + 6 B L S^2 Hq d) / step time / peak; "
             "see bench/flops.py", f"CSV: {out}"]
    common.print_table("QLoRA training steps", table, list(table[0]) if table else ["framework"],
                       ctx, notes)


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
