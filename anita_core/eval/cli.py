"""eval.py / python -m anita_core.eval: lm-evaluation-harness tasks on a model with an
optional LoRA adapter, writing lm-eval's results JSON.

    python eval.py --model DIR --adapter runs/dpo-dpo/adapter --preset anita
    python eval.py --model DIR --tasks my_task --include-path tasks/ --limit 50
    python eval.py --model DIR --adapter A --tasks arc_it --lm hf     # lm-eval's own HF model

--lm anita (default): anita's model, the NF4 base (quantized on load, or read as
stored from a bitsandbytes 4-bit checkpoint) plus the adapter, the numerics the
adapter was trained with (anita_core/eval/lm.py). --lm hf: lm-eval's HF model on
the same folder (``pretrained=DIR,peft=ADAPTER``, the weights as stored, in
--hf-dtype), for comparison. Task names (and the datasets of hub tasks) are checked
before the model loads; --preset anita runs the paper's Open Italian LLM
Leaderboard tasks: arc_it and hellaswag_it 0-shot, m_mmlu_it 5-shot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
PROG = "eval.py"


def build_parser() -> argparse.ArgumentParser:
    from anita_core.eval.tasks import PRESETS
    from anita_core.cli.common import add_threads_argument
    from anita_core.cli.flag_types import (FlagParser, HelpFormatter, non_negative_int, positive_int,
                                             seed_int)
    p = FlagParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (default: none)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    which.add_argument("--preset", choices=sorted(PRESETS),
                       help="anita: arc_it, hellaswag_it 0-shot and m_mmlu_it 5-shot")
    p.add_argument("--num-fewshot", type=non_negative_int, default=None,
                   help="few-shot examples for every task (default: the preset's, else each task's own)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of local task YAMLs (repeatable)")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="only the tasks of --include-path (skips indexing lm-eval's built-in tasks; "
                        "that is automatic when --include-path holds every task named)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N documents of each task (default: all)")
    p.add_argument("--lm", choices=("anita", "hf"), default="anita",
                   help="anita: anita's NF4 model + adapter; hf: lm-eval's HF model on the stored weights")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="--lm anita: compute dtype (auto: bf16 on a GPU, fp32 on the CPU, as training)")
    p.add_argument("--hf-dtype", default="float32", help="--lm hf: the dtype transformers loads in")
    p.add_argument("--batch-tokens", type=positive_int, default=4096,
                   help="--lm anita: tokens per packed scoring row")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="context tokens (default: the model's max_position_embeddings)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="results JSON (default: runs/eval/<model>[-<adapter>]/results.json)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every document's requests and answers (samples_<task>.jsonl)")
    p.add_argument("--seed", type=seed_int, default=0, help="lm-eval's few-shot sampling seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(p)
    return p


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_output(args) -> Path:
    name = Path(args.model.rstrip("/")).name + (f"-{Path(args.adapter.rstrip('/')).name}"
                                                if args.adapter else "")
    from anita_core.cli.common import default_output_dir
    return Path(default_output_dir("eval")) / name / "results.json"


def check_paths(parser, args) -> None:
    """The model folder (config, file headers, tokenizer) and the adapter, checked as
    the trainers check theirs (train/input_checks.py), and the task folders."""
    from anita_core.train.input_checks import BadInput, check_adapter, check_model
    if not Path(args.model).is_dir():
        parser.error(f"argument --model: {args.model}: no such model directory")
    try:
        checked = check_model(args.model)
        if args.adapter is not None:
            check_adapter("--adapter", args.adapter, checked.config)
    except BadInput as e:
        parser.error(f"argument {e}")
    if args.no_builtin_tasks and not args.include_path:
        parser.error("argument --no-builtin-tasks: needs --include-path (the tasks to run)")
    for folder in args.include_path or []:
        if not Path(folder).is_dir():
            parser.error(f"argument --include-path: {folder}: no such folder")


def make_lm(args):
    """The lm-eval LM --lm asks for, with the line that says what runs."""
    if args.lm == "hf":
        from lm_eval.models.huggingface import HFLM
        kwargs = dict(pretrained=args.model, dtype=args.hf_dtype, device="cpu", batch_size=8)
        if args.adapter:
            kwargs["peft"] = args.adapter
        if args.max_length:
            kwargs["max_length"] = args.max_length
        return HFLM(**kwargs), f"lm-eval's HF model, {args.hf_dtype} weights as stored"
    from anita_core.data import load_tokenizer
    from anita_core.eval.lm import AnitaLM
    from anita_core.hf import load_model
    from anita_core.lora import load_peft
    from anita_core.cli.common import compute_dtype
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, compute_dtype=compute_dtype(args.dtype), device=device,
                           progress=not args.no_progress)
        if args.adapter:
            model.adapters = load_peft(args.adapter, model.config, device=device)
    except (ValueError, FileNotFoundError) as e:
        _say(f"{PROG}: error: {e}")
        raise SystemExit(EXIT_BAD_INPUT)
    lm = AnitaLM(model, tokenizer, max_length=args.max_length, batch_tokens=args.batch_tokens,
                 progress=not args.no_progress)
    what = ("anita's model, NF4 base" + (f" + adapter {args.adapter}" if args.adapter else "")
            + f", {str(model.dtype).replace('torch.', '')} compute on {device}")
    return lm, f"{what} ({time.perf_counter() - started:.1f}s to load)"


def merge_results(into: dict, more: dict) -> dict:
    """Two simple_evaluate outputs (different few-shot counts) as one."""
    if not into:
        return more
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "samples", "group_subtasks"):
        if key in more:
            into.setdefault(key, {}).update(more[key])
    return into


def write_results(results: dict, output: Path, log_samples: bool) -> None:
    """lm-eval's results JSON (its own serializer), written atomically; samples beside it."""
    from lm_eval.utils import handle_non_serializable
    output.parent.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    files = {output: json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)}
    if log_samples and samples:
        for task, docs in samples.items():
            files[output.parent / f"samples_{task}.jsonl"] = "".join(
                json.dumps(d, default=handle_non_serializable, ensure_ascii=False) + "\n" for d in docs)
    for path, text in files.items():
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_paths(parser, args)
    from anita_core.cli.common import apply_threads
    apply_threads(args.threads)
    from anita_core.eval import tasks as eval_tasks
    names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not names:
        parser.error("argument --tasks: no task name given")
    plan = eval_tasks.requested(names, args.preset, args.num_fewshot)
    manager = eval_tasks.task_manager(list(plan), args.include_path, builtin=not args.no_builtin_tasks)
    try:
        eval_tasks.check_names(manager, list(plan))
        built = eval_tasks.build_tasks(manager, list(plan))    # datasets read before the model
    except eval_tasks.TaskError as e:
        parser.error(f"argument --{'preset' if args.preset else 'tasks'}: {e}")
    del built            # built again by simple_evaluate with each few-shot count (cached by datasets)
    output = Path(args.output) if args.output else default_output(args)
    lm, what = make_lm(args)
    _say(f"evaluating with {what}: " + ", ".join(
        f"{t} ({'default' if n is None else n}-shot)" for t, n in plan.items()))
    from lm_eval import evaluator
    results: dict = {}
    for shots in dict.fromkeys(plan.values()):
        group = [t for t, n in plan.items() if n == shots]
        results = merge_results(results, evaluator.simple_evaluate(
            model=lm, tasks=group, num_fewshot=shots, limit=args.limit, task_manager=manager,
            log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed))
    from lm_eval.utils import make_table
    print(make_table(results), flush=True)
    write_results(results, output, args.log_samples)
    _say(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
