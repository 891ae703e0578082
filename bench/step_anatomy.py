"""What one SFT training step does, per decoder layer: kernel launches, torch matmuls,
dtype-conversion copies, FLOPs, peak live activation bytes.

    python -m bench.step_anatomy                       # bundled tiny model, bf16, LoRA on all 7
    python -m bench.step_anatomy --dtype fp32 --batch 2 --seq 64 --rank 16 --dropout 0.1
    python -m bench.step_anatomy --targets q_proj,v_proj --json out.json
    python -m bench.step_anatomy --no-recompute      # every layer's activations kept
    python -m bench.step_anatomy --batch 2 --seq 256 --documents 2   # 512 tokens, packed rows

How each figure is caught (runs through the Triton interpreter on a CPU and on a GPU):
  * Triton launches: every launch site in csrc_triton reports itself to
    csrc_triton._runtime.record_launch (the interpreter fires none of Triton's own
    launch hooks), with the matmul FLOPs of NF4 launches;
  * torch matmuls and conversion copies: a TorchDispatchMode sees every aten op;
    a matmul is mm/addmm/bmm/baddbmm (any overload), a conversion copy is an op
    that writes a tensor of another floating dtype than its input (_to_copy, or
    copy_ between dtypes), measured in bytes written / bytes of one [tokens x hidden]
    activation in the compute dtype;
  * same-dtype copies of activation-shaped tensors (contiguous, cat, clone, copy_):
    bench/copy_count.py, in the same unit;
  * per layer: the model's LayerHooks say which layer (and forward or backward)
    runs; ops outside every layer (embedding, final norm, loss) are listed apart;
  * FLOPs of the projections (NF4 matmuls and LoRA products, as executed; attention
    is left out of both sides) relative to the minimum of a frozen-base LoRA step
    without recompute: per projection [N, K] with rank r over T tokens, forward
    2TNK + 2TKr + 2TNr (x W^T, x A^T, xa B^T), backward 2TNK (dY W) + 2TNr (dY B)
    + 2TNr (dB) + 2TKr (dA) + 2TKr (g A): 4TNK + 6Tr(K + N) (minimum_flops);
  * peak live activation bytes: every tensor an op creates during the step is held
    by a weak reference until it dies; the peak of the sum of live storages (each
    counted once), relative to one activation. Weights and adapters made before the
    step are not counted;
  * host syncs: bench.host_syncs.HostSyncCounter over the step, which gets the
    batch's facts counted on the host as the trainer's objectives do.

Without ``--json`` it prints a table; ``--json`` writes the figures too.
"""
from __future__ import annotations

import argparse
import collections
import sys
import weakref
from pathlib import Path
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import csrc_triton
from anita_core.model.batch_facts import batch_facts
from bench.copy_count import SameDtypeCopies
from bench.host_syncs import HostSyncCounter
from csrc_triton import _runtime

TINY_MODEL = Path(__file__).resolve().parent.parent / "anita_core" / "assets" / "tiny-llama3"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUTSIDE = "outside layers"

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addmm_", "baddbmm_", "matmul"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _matmul_flops(name: str, args) -> int:
    if name in ("mm", "matmul"):
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("addmm", "addmm_"):
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


class Section:
    """Counts of one layer (or of everything outside the layers)."""

    def __init__(self):
        self.launches: collections.Counter = collections.Counter()
        self.matmuls = 0
        self.flops = 0
        self.conversion_bytes = 0
        self.conversions: collections.Counter = collections.Counter()
        self.peak_live_bytes = 0            # all step tensors alive while this section ran

    def as_dict(self, activation_bytes: int) -> dict:
        return dict(triton_launches=sum(self.launches.values()),
                    launches_by_kernel=dict(sorted(self.launches.items())),
                    torch_matmuls=self.matmuls,
                    launches_plus_matmuls=sum(self.launches.values()) + self.matmuls,
                    conversion_copies_in_activations=self.conversion_bytes / activation_bytes,
                    conversions=dict(self.conversions), flops=self.flops,
                    peak_live_in_activations=self.peak_live_bytes / activation_bytes)


class StepRecorder(TorchDispatchMode):
    """The TorchDispatchMode half, plus the launch listener and the layer hooks'
    notion of where the step is."""

    def __init__(self):
        super().__init__()
        self.sections: Dict[str, Section] = collections.defaultdict(Section)
        self.where = OUTSIDE
        self.live: Dict[int, tuple] = {}         # storage key -> (bytes, [weakrefs])
        self.live_bytes = 0
        self.peak_bytes = 0

    # -- launches ------------------------------------------------------------------
    def on_launch(self, kernel: str, flops: int) -> None:
        section = self.sections[self.where]
        section.launches[kernel] += 1
        section.flops += flops

    # -- torch ops -----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        section = self.sections[self.where]
        if name in _MATMULS:
            section.matmuls += 1
            section.flops += _matmul_flops(name, args)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            source, target = args[1], args[0]
        else:
            target = out if isinstance(out, torch.Tensor) else None
        if (name in ("_to_copy", "copy_") and source is not None and target is not None
                and source.dtype in _FLOATS and target.dtype in _FLOATS
                and source.dtype != target.dtype):
            section.conversion_bytes += target.numel() * target.element_size()
            section.conversions[f"{source.dtype}->{target.dtype}".replace("torch.", "")] += 1
        self._track(out)
        return out

    def _track(self, out) -> None:
        tensors = [out] if isinstance(out, torch.Tensor) else \
            [t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = (storage.nbytes(), [])
                self.live_bytes += entry[0]
            entry[1].append(weakref.ref(t))
        self._sweep()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        section = self.sections[self.where]
        section.peak_live_bytes = max(section.peak_live_bytes, self.live_bytes)

    def _sweep(self) -> None:
        for key in list(self.live):
            nbytes, refs = self.live[key]
            refs[:] = [r for r in refs if r() is not None]
            if not refs:
                del self.live[key]
                self.live_bytes -= nbytes


def _layer_hooks_class():
    from anita_core.model.llama import LayerHooks

    class WhereHooks(LayerHooks):
        def __init__(self, recorder: StepRecorder):
            self.recorder = recorder

        def before_layer(self, i: int, phase: str) -> None:
            self.recorder.where = f"layer {i}"

        def after_layer(self, i: int, phase: str) -> None:
            self.recorder.where = OUTSIDE
    return WhereHooks


def keep_every_layer(model) -> None:
    """Every layer's activations kept for its backward (the model's own layer loop with
    a KEEP policy on each layer): nothing recomputed, so the without-recompute figures
    can be counted. Its dense dequantized weights are kept from the forward to the
    backward too (reuse_weights), as a recompute's are."""
    from anita_core.model.block import Activations, LayerPolicy
    model.set_layer_strategies(LayerPolicy(Activations.KEEP, reuse_weights=True))


def minimum_flops(model, tokens: int) -> int:
    """Projection FLOPs of one layer's step with nothing recomputed and nothing wasted:
    per projection [N, K] (LoRA rank r, or none) 4TNK + 6Tr(K+N)."""
    from anita_core.model.config import projection_shapes
    shapes = projection_shapes(model.config)
    total = 0
    for name, (n, k) in shapes.items():
        total += 4 * tokens * n * k
        pair = model.adapters.get(0, name) if model.adapters is not None else None
        if pair is not None:
            total += 6 * tokens * pair[0].shape[0] * (k + n)
    return total


def build_model(args, device: torch.device):
    from anita_core.hf.load import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    model = load_model(args.model, compute_dtype=DTYPES[args.dtype], device=device, progress=False)
    if args.no_fusion:              # every projection on its own (the members stay views)
        for layer in model.base.layers:
            layer.fused.clear()
    if args.targets:
        lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=args.dropout,
                          target_modules=tuple(args.targets.split(",")))
        model.adapters = LoRAAdapters.init(lora, model.config, device=device)
        with torch.no_grad():               # B starts at zero: give every product real values
            for p in model.adapters.parameters():
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1
                p.add_(noise.to(p.device))
    return model


def packed_documents(batch: int, seq: int, documents: int):
    """(position_ids, segment_ids) [B, S] of rows packed with ``documents`` documents of
    (nearly) equal length each, positions restarting at 0 in each; (None, None) for 1."""
    if documents == 1:
        return None, None
    index = torch.arange(seq)
    segment = (index * documents) // seq
    start = torch.searchsorted(segment, segment, right=False)   # first index of each document
    return (index - start).expand(batch, seq).contiguous(), segment.expand(batch, seq).contiguous()


def measure(args) -> dict:
    """One SFT train_step of the configured model; figures per layer."""
    from bench.common import bench_device
    device = bench_device()
    model = build_model(args, device)
    V = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (args.batch, args.seq), generator=generator)
    targets = torch.randint(0, V, (args.batch, args.seq), generator=generator)
    positions, segments = packed_documents(args.batch, args.seq, args.documents)
    facts = batch_facts(ids, targets, positions, V)     # on the host, as SFTObjective does
    ids, targets = ids.to(device), targets.to(device)
    if positions is not None:
        positions, segments = positions.to(device), segments.to(device)
    # warm caches (dequantized weights, tables)
    model.train_step(ids, targets, positions, segments, facts=facts)
    if model.adapters is not None:
        model.adapters.zero_grad()
    recorder, syncs = StepRecorder(), HostSyncCounter(model.device)
    model.layer_hooks = _layer_hooks_class()(recorder)
    tokens = args.batch * args.seq
    copies = SameDtypeCopies(lambda: recorder.where, tokens)
    if args.no_recompute:
        keep_every_layer(model)
    with _runtime.listen_to_launches(recorder.on_launch), recorder, copies, syncs:
        model.train_step(ids, targets, positions, segments, facts=facts)
    activation_bytes = tokens * model.config.hidden_size * DTYPES[args.dtype].itemsize
    n_layers = model.config.num_hidden_layers
    layers = {f"layer {i}": dict(recorder.sections[f"layer {i}"].as_dict(activation_bytes),
                                 **copies.sections[f"layer {i}"].as_dict(activation_bytes))
              for i in range(n_layers)}
    minimum = minimum_flops(model, tokens)
    for row in layers.values():
        row["flops_vs_minimum"] = row["flops"] / minimum
    return dict(config=vars(args), device=str(device), runtime=csrc_triton.runtime_description(),
                tokens=tokens, activation_bytes=activation_bytes, minimum_layer_flops=minimum,
                peak_live_bytes=recorder.peak_bytes,
                peak_live_in_activations=recorder.peak_bytes / activation_bytes,
                host_syncs=[f"{s.what} at {s.where}" for s in syncs.syncs],
                layers=layers, outside=recorder.sections[OUTSIDE].as_dict(activation_bytes))


def format_report(result: dict) -> str:
    c = result["config"]
    lines = [f"step_anatomy: SFT train_step, {c['model']}, {c['dtype']}, batch {c['batch']} x "
             f"seq {c['seq']} ({result['tokens']} tokens), LoRA {c['targets'] or 'none'} "
             f"r {c['rank']} dropout {c['dropout']}, {c['documents']} document(s) per row, "
             f"{'activations kept' if c['no_recompute'] else 'recompute'}"
             f"{', unfused' if c['no_fusion'] else ''}; {result['runtime']}",
             f"{'layer':10s} {'launches':>8s} {'matmuls':>8s} {'sum':>5s} {'conv.copies':>11s} "
             f"{'same.copies':>11s} "
             f"{'FLOPs/min':>9s} {'peak live':>9s}  launches by kernel"]
    for name, row in result["layers"].items():
        kernels = ", ".join(f"{k.strip('_').removesuffix('_kernel')} {v}"
                            for k, v in row["launches_by_kernel"].items())
        lines.append(f"{name:10s} {row['triton_launches']:8d} {row['torch_matmuls']:8d} "
                     f"{row['launches_plus_matmuls']:5d} "
                     f"{row['conversion_copies_in_activations']:10.2f}a "
                     f"{row['same_dtype_copies_in_activations']:10.2f}a "
                     f"{row['flops_vs_minimum']:9.3f} {row['peak_live_in_activations']:8.1f}a  "
                     f"{kernels}")
    lines.append(f"a = one activation, [tokens x hidden] in the compute dtype = "
                 f"{result['activation_bytes']} bytes; peak live = every tensor made in the step "
                 "and alive while the layer ran (block inputs of all layers included)")
    lines.append(f"whole step: peak live {result['peak_live_in_activations']:.1f}a; outside the "
                 f"layers {result['outside']['launches_plus_matmuls']} launches + matmuls; "
                 f"{len(result['host_syncs'])} host syncs"
                 + "".join(f"\n  host sync: {s}" for s in result["host_syncs"]))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL), help="HF LLaMA checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="compute dtype of the activations")
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--seq", type=int, default=32, help="tokens per row")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="comma-separated LoRA target projections ('' for no LoRA)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--documents", type=int, default=1,
                        help="documents packed into each row (equal lengths, segment ids and "
                             "positions restarting per document); 1: no segment ids")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p")
    parser.add_argument("--no-fusion", action="store_true",
                        help="run q/k/v and gate/up as separate matmuls (for comparison)")
    parser.add_argument("--no-recompute", action="store_true",
                        help="keep every layer's activations instead of recomputing them "
                             "in the backward")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for flag in ("batch", "seq", "rank", "documents"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.documents > args.seq:
        parser.error(f"argument --documents: {args.documents} documents do not fit in "
                     f"--seq {args.seq} tokens")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"argument --dropout: must be in [0, 1), got {args.dropout}")
    if not Path(args.model, "config.json").is_file():
        parser.error(f"argument --model: {args.model} has no config.json")
    return args


def main(argv=None) -> int:
    from bench.common import report_main
    return report_main(parse_args, measure, format_report, argv)


if __name__ == "__main__":
    sys.exit(main())
