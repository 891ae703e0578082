"""Host synchronizations of SFT training: every point where the host waits for the device.

    python -m bench.host_syncs                            # triton backend, bf16, accumulation 4
    python -m bench.host_syncs --backend torch --dtype fp32 --batch 4 --seq 128
    python -m bench.host_syncs --json syncs.json

On a GPU each read of a device value back to the host (``.item()``, ``float(t)``,
``if t:``, ``.tolist()``, a ``nonzero`` or boolean mask whose size the host must
learn, a device-to-host copy, a blocking host-to-device copy) drains the launch
queue: the GPU idles while Python issues the next kernels. ``HostSyncCounter``
counts them, wherever they happen, so that a CPU run can show what a GPU run pays:

  * a TorchDispatchMode sees every aten op: ``_local_scalar_dense`` (what item,
    float, int and bool come down to), ``nonzero``, ``masked_select``, ``unique``,
    ``equal``, ``repeat_interleave`` without an output size, ``index`` /
    ``index_put_`` with a boolean mask, and copies between the CPU and a device
    (device -> host unless non_blocking; host -> device unless non_blocking from
    pinned memory: torch synchronizes the stream after a blocking copy, and the
    driver may for pageable memory);
  * a TorchFunctionMode sees what never reaches the dispatcher on a CPU:
    ``.tolist()`` and the other reads, and ``.to(device)`` / ``.cpu()``, which a
    CPU run does not copy. A host -> device move there (the batch handed to the
    model) is counted unless ``non_blocking=True``, and its result is a device
    tensor from then on.

Host or device: on a CPU every tensor is a CPU tensor, so the counter keeps the
distinction itself. Host tensors, whose reads synchronize nothing: those handed
to ``mark_host`` (the CPU-side batches), those a factory makes without a device
argument or with ``device="cpu"`` (a CPU tensor on a GPU machine too: e.g.
torch AdamW's step counters unless fused or capturable), downloads, and everything computed from host
tensors alone. Everything else (weights, adapters, activations, what a factory
makes on a device given as a torch.device) is a device tensor. On a CPU run the
model's device is the CPU, so the host counts as named only as such: ``.cpu()``
or the string "cpu" (a factory's ``device="cpu"``, ``.to("cpu")``, a download);
``.to(device)`` of a device tensor is taken for the no-op it is on a GPU.

``measure`` drives real optimizer steps of train_sft.py's Trainer and
SFTObjective (packed sample data, LoRA on all 7 projections, logging every step,
the adamw optimizer) and attributes every sync to its step and micro-batch.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = "outside"

# aten ops whose result the host must wait for (its value, or a size that
# depends on the values)
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "equal", "bincount",
})
_BOOL_INDEXED = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
# Tensor methods that hand a value to Python (seen at the function level, where a
# CPU run's .tolist() is visible at all); one count each, not one per element
_READS = frozenset({"tolist", "item", "__bool__", "__float__", "__int__", "__index__",
                    "__complex__", "numpy"})
_MOVES = frozenset({"to", "cuda", "cpu"})
_FACTORIES = frozenset({"tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "full", "empty",
                        "empty_strided", "arange", "linspace", "logspace", "eye", "rand", "randn",
                        "randint", "randperm", "from_numpy"})


@dataclass
class Sync:
    section: str        # e.g. "step 2 micro-batch 3", or "step 2" outside the micro-batches
    what: str           # the op or method
    where: str          # the innermost frame of this repository outside this file


def _caller() -> str:
    here = Path(__file__).resolve()
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != here and REPO in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "(outside the repository)"


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _device_of(value) -> Optional[torch.device]:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, (str, torch.device)) or (isinstance(value, int)
                                                   and not isinstance(value, bool)):
        try:
            return torch.device(value)
        except (RuntimeError, TypeError):
            return None
    return None


def _move_target(name: str, args, kwargs):
    """(device, literal) a Tensor.to / .cuda / .cpu call names: literal when the host
    is named as such (.cpu(), the string "cpu"); (None, False) for a dtype-only .to."""
    if name == "cpu":
        return torch.device("cpu"), True
    if name == "cuda":
        index = args[1] if len(args) > 1 else kwargs.get("device")
        return (index if isinstance(index, torch.device) else
                torch.device("cuda" if index is None else index)), False
    candidates = ([kwargs["device"]] if kwargs.get("device") is not None else []) + list(args[1:])
    for value in candidates:
        device = _device_of(value)
        if device is not None:
            return device, isinstance(value, str) and device.type == "cpu"
    return None, False


class HostSyncCounter:
    """Counts host synchronizations while active (``with counter:``); ``section``
    names where the program is (set it around each micro-batch). ``device`` is the
    model's device: a move of a host tensor to it is an upload."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.section = OUTSIDE
        self.syncs: List[Sync] = []
        self._host: Dict[int, object] = {}     # id -> weakref of a host tensor
        self._reading = 0                      # inside a counted method: its ops are not counted again
        self._modes = ()

    # -- host or device ----------------------------------------------------------
    def mark_host(self, *tensors) -> None:
        import weakref
        for t in _tensors(tensors):
            self._host[id(t)] = weakref.ref(t)

    def unmark(self, t: torch.Tensor) -> None:
        self._host.pop(id(t), None)

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    # -- counting ----------------------------------------------------------------
    def count(self, what: str) -> None:
        if not self._reading:
            self.syncs.append(Sync(self.section, what, _caller()))

    def in_section(self, prefix: str) -> List[Sync]:
        """Syncs of ``prefix`` and of every section under it ("step 2" holds
        "step 2 micro-batch 1")."""
        return [s for s in self.syncs if s.section == prefix or s.section.startswith(prefix + " ")]

    def per_section(self) -> Dict[str, int]:
        return dict(collections.Counter(s.section for s in self.syncs))

    def __enter__(self) -> "HostSyncCounter":
        self._modes = (_FunctionHalf(self), _DispatchHalf(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = ()

    # -- what each half calls ----------------------------------------------------
    def _read(self, func, name, args, kwargs):
        if not self.is_host(args[0]):
            self.count(f"Tensor.{name}")
        self._reading += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._reading -= 1

    def _move(self, func, name, args, kwargs):
        src, (target, literal_host) = args[0], _move_target(name, args, kwargs)
        host = self.is_host(src)
        if self.device.type == "cpu" and target is not None and not host and not literal_host:
            target = None          # a device tensor to the model's device (the CPU): no move
        if target is None or (host and target.type == "cpu"
                              and (literal_host or self.device.type != "cpu")):
            return func(*args, **kwargs)                    # a dtype change, or host to host
        upload = host
        if upload:
            asynchronous = bool(kwargs.get("non_blocking", False)) and (
                self.device.type == "cpu" or src.is_pinned())
            if not asynchronous:
                self.count("host->device copy (blocking)")
        elif target.type == "cpu":
            self.count("device->host copy")
        else:
            return func(*args, **kwargs)                    # device to device
        self._reading += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self._reading -= 1
        if out is src:                                      # a CPU run moved nothing
            with torch.no_grad():
                out = src.view_as(src)
        if upload:
            self.unmark(out)
        else:
            self.mark_host(out)
        return out

    def _made(self, func, args, kwargs):
        """A factory call: without a device argument, or with the string "cpu", it
        makes a CPU tensor on a GPU machine too, i.e. a host tensor."""
        out = func(*args, **kwargs)
        device = kwargs.get("device")
        if (device is None or device == "cpu") and isinstance(out, torch.Tensor):
            self.mark_host(out)
        return out

    def _dispatched(self, func, args, kwargs):
        name = func._schema.name.split("::")[-1]
        inputs = _tensors((args, kwargs))
        host = bool(inputs) and all(self.is_host(t) for t in inputs)
        if not host:
            self._check_dispatched(name, args, kwargs)
        out = func(*args, **kwargs)
        if host or (name == "_to_copy" and _copy_direction(args[0].device, kwargs.get("device"))
                    == "device->host"):
            self.mark_host(out)
        return out

    def _check_dispatched(self, name, args, kwargs) -> None:
        if name in SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None):
            self.count(name)
        elif name in _BOOL_INDEXED and len(args) > 1 and any(
                t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
            self.count(f"{name} with a boolean mask")
        elif name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            dst, src = args[0], args[1]
            non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            direction = _copy_direction(src.device, dst.device)
            if direction is None and self.is_host(dst) != self.is_host(src):   # a CPU run
                direction = "device->host" if self.is_host(dst) else "host->device"
            self._count_copy(direction, src, non_blocking)
        elif name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
            self._count_copy(_copy_direction(args[0].device, kwargs.get("device")), args[0],
                             bool(kwargs.get("non_blocking", False)))

    def _count_copy(self, direction: Optional[str], src: torch.Tensor, non_blocking: bool) -> None:
        if direction == "device->host" and not non_blocking:
            self.count("device->host copy")
        elif direction == "host->device" and not (
                non_blocking and (src.device.type == self.device.type or src.is_pinned())):
            # (a CPU run cannot pin: non_blocking is enough there)
            self.count("host->device copy (blocking)")


def _copy_direction(src: torch.device, dst) -> Optional[str]:
    """"device->host", "host->device", or None (same side, or no device named)."""
    if dst is None:
        return None
    src_cpu, dst_cpu = src.type == "cpu", torch.device(dst).type == "cpu"
    if src_cpu == dst_cpu:
        return None
    return "device->host" if dst_cpu else "host->device"


class _FunctionHalf(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and func is getattr(torch.Tensor, name, None):
            if name in _READS:
                return self.counter._read(func, name, args, kwargs)
            if name in _MOVES:
                return self.counter._move(func, name, args, kwargs)
        if name in _FACTORIES and func is getattr(torch, name, None):
            return self.counter._made(func, args, kwargs)
        return func(*args, **kwargs)


class _DispatchHalf(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.counter._dispatched(func, args, kwargs or {})


# ----------------------------------------------------------------------------
# SFT optimizer steps, counted

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TINY_MODEL = REPO / "anita_core" / "assets" / "tiny-llama3"


class SectionedObjective:
    """An objective whose micro-batches file their syncs under their own section."""

    def __init__(self, objective, counter: HostSyncCounter):
        self.objective, self.counter, self.micro_batch = objective, counter, 0

    def units(self, batch) -> int:
        return self.objective.units(batch)

    def micro_step(self, batch, grad_scale):
        step_section = self.counter.section
        self.micro_batch += 1
        self.counter.section = f"{step_section} micro-batch {self.micro_batch}"
        try:
            return self.objective.micro_step(batch, grad_scale)
        finally:
            self.counter.section = step_section

    def evaluate(self, batches):
        return self.objective.evaluate(batches)


def counted_trainer(counter: HostSyncCounter, *args, **kwargs):
    """anita_core.train.trainer.Trainer whose steps and checkpoints set the section."""
    from anita_core.train.trainer import Trainer

    class CountedTrainer(Trainer):
        def _train_one_step(self):
            counter.section = f"step {self.step + 1}"
            self.objective.micro_batch = 0
            return super()._train_one_step()

        def save(self):
            counter.section = "checkpoint"
            return super().save()

    return CountedTrainer(*args, **kwargs)


def measure(args) -> dict:
    """``args.steps`` optimizer steps of ``args.accumulation`` micro-batches each,
    every sync counted and filed under its step and micro-batch."""
    from anita_core.assets import sample_path
    from anita_core.data import SFTDataConfig, build_sft_data, load_tokenizer, sft_batches
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.model.ops import use_backend
    from anita_core.train.objectives import SFTObjective
    from anita_core.train.trainer import TrainConfig
    from bench.common import bench_device
    with use_backend(args.backend), tempfile.TemporaryDirectory() as out:
        tokenizer = load_tokenizer(args.model)
        data = build_sft_data(SFTDataConfig(sample_path("instruction"), max_seq_length=args.seq,
                                            seed=0), tokenizer)
        batches = sft_batches(data.train, batch_size=args.batch, seq_len=args.seq,
                              pad_id=tokenizer.pad_id, shuffle_seed=0)[:args.steps * args.accumulation]
        # the GPU when there is one: the compiled kernels refuse CPU tensors
        model = load_model(args.model, compute_dtype=DTYPES[args.dtype], device=bench_device(),
                           progress=False)
        model.adapters = LoRAAdapters.init(LoRAConfig(r=args.rank, alpha=2.0 * args.rank,
                                                      dropout=args.dropout, seed=0), model.config,
                                           device=model.device)
        counter = HostSyncCounter(model.device)
        counter.mark_host(batches)
        config = TrainConfig(output_dir=out, learning_rate=2e-4, weight_decay=0.01, optimizer="adamw",
                             gradient_accumulation_steps=args.accumulation, max_steps=args.steps,
                             logging_steps=1, save_minutes=0.0, progress=args.progress)
        trainer = counted_trainer(counter, model, model.adapters,
                                  SectionedObjective(SFTObjective(model), counter),
                                  lambda epoch: batches, config, log=lambda message: None)
        with counter:
            trainer.train()
    steps = []
    for s in range(1, args.steps + 1):
        micro = [len(counter.in_section(f"step {s} micro-batch {k}"))
                 for k in range(1, args.accumulation + 1)]
        steps.append(dict(step=s, per_micro_batch=micro, per_step=len(counter.in_section(f"step {s}"))))
    return dict(config=vars(args), steps=steps, optimizer=type(trainer.optimizer).__name__,
                tokens_per_micro_batch=args.batch * args.seq,
                checkpoint=len(counter.in_section("checkpoint")),
                syncs=[asdict(s) for s in counter.syncs])


def format_report(result: dict) -> str:
    c = result["config"]
    lines = [f"host_syncs: train_sft-like optimizer steps, {c['backend']} backend, {c['dtype']}, "
             f"accumulation {c['accumulation']}, micro-batches of {c['batch']} x {c['seq']} packed "
             f"tokens, LoRA r {c['rank']} on all 7, logging every step, {result['optimizer']}"]
    for row in result["steps"]:
        lines.append(f"step {row['step']}: {row['per_step']} syncs in all; per micro-batch "
                     + ", ".join(str(n) for n in row["per_micro_batch"]))
    lines.append(f"final checkpoint: {result['checkpoint']} syncs")
    def group(section: str) -> str:
        step = section.split(" micro-batch")[0]
        return step + (" (micro-batches)" if step != section else "")
    grouped = collections.Counter((group(s["section"]), s["what"], s["where"])
                                  for s in result["syncs"])
    for (section, what, where), n in sorted(grouped.items()):
        lines.append(f"  {section:26s} {n:3d} x {what:32s} {where}")
    return "\n".join(lines)


def parse_args(argv=None):
    from anita_core.model.ops import BACKENDS
    from anita_core.cli.flag_types import int_at_least, positive_int, probability_0_1
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=_model_folder, default=str(TINY_MODEL),
                        help="HF LLaMA checkpoint folder")
    parser.add_argument("--backend", choices=BACKENDS, default="triton", help="who runs the model's ops")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype")
    parser.add_argument("--batch", type=positive_int, default=1, help="packed rows per micro-batch")
    parser.add_argument("--seq", type=int_at_least(2), default=64, help="tokens per packed row")
    parser.add_argument("--accumulation", type=positive_int, default=4,
                        help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=positive_int, default=2,
                        help="optimizer steps (the first warms up)")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    parser.add_argument("--dropout", type=probability_0_1, default=0.0, help="LoRA dropout p")
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def _model_folder(text: str) -> str:
    if not Path(text, "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no config.json")
    return text


def main(argv=None) -> int:
    from bench.common import report_main
    return report_main(parse_args, measure, format_report, argv)


if __name__ == "__main__":
    sys.exit(main())
