"""Same-dtype copies of activation-shaped tensors, per layer of a step (bench/step_anatomy).

A GPU pays for a copy whatever its dtype: a ``.contiguous()`` of a strided view, a
``torch.cat`` of pieces, a ``clone`` write every byte once and read it once more. The
conversion counter of step_anatomy sees only copies between dtypes; this one sees
the others:

  * ops that only move values: ``clone`` (``.contiguous()`` of a strided tensor and
    ``.clone()`` dispatch to it), ``cat`` / ``stack``, ``_to_copy`` / ``copy_`` whose
    source and target have the same floating dtype (two views of one storage at one
    offset are the interpreter writing its arguments back: not a copy);
  * activation-shaped: the output's first dimension is the step's token count, or,
    for a tensor of 3 or more dimensions ([B, S, heads, D]), its first two together
    (weights and LoRA factors are not);
  * measured in bytes written, reported in units of one [tokens x hidden] activation
    in the compute dtype (step_anatomy's ``a``); every same-dtype float copy, of any
    shape, is also summed apart (``all_bytes``).

Counting is a TorchDispatchMode that only looks (it runs each op unchanged); the
section it charges is whatever ``where()`` says when the op runs.
"""
from __future__ import annotations

import collections
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COPY_OPS = frozenset({"clone", "cat", "stack", "_to_copy", "copy_"})
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CopySection:
    """Same-dtype copies of one section (a layer, or everything outside the layers)."""

    def __init__(self):
        self.activation_bytes = 0           # activation-shaped copies
        self.all_bytes = 0                  # every same-dtype float copy
        self.ops: collections.Counter = collections.Counter()   # activation-shaped, by op

    def as_dict(self, one_activation: int) -> dict:
        return dict(same_dtype_copies_in_activations=self.activation_bytes / one_activation,
                    same_dtype_copies_all_in_activations=self.all_bytes / one_activation,
                    same_dtype_copy_ops=dict(sorted(self.ops.items())))


def activation_shaped(t: torch.Tensor, tokens: int) -> bool:
    """Whether ``t`` has one row (or, from 3 dims on, one [B, S] leading cell) per token."""
    shape = tuple(t.shape)
    return bool(shape) and (shape[0] == tokens or (len(shape) >= 3 and shape[0] * shape[1] == tokens))


def _same_storage_and_offset(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())


def _copied(name: str, args, out):
    """(source, target) of a same-dtype copy op, or None."""
    if name not in COPY_OPS:
        return None
    if name == "copy_":
        if len(args) < 2 or not isinstance(args[1], torch.Tensor):
            return None
        source, target = args[1], args[0]
        if _same_storage_and_offset(source, target):
            return None
    elif name in ("cat", "stack"):
        pieces = [t for t in (args[0] if args else ()) if isinstance(t, torch.Tensor)]
        if not pieces or not isinstance(out, torch.Tensor):
            return None
        source, target = pieces[0], out
    else:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return None
        source, target = args[0], out
    if source.dtype != target.dtype or target.dtype not in _FLOATS:
        return None
    return source, target


class SameDtypeCopies(TorchDispatchMode):
    """Counts same-dtype copies per section; ``where()`` names the section of each op."""

    def __init__(self, where: Callable[[], str], tokens: int):
        super().__init__()
        self.where, self.tokens = where, tokens
        self.sections: Dict[str, CopySection] = collections.defaultdict(CopySection)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        copied = _copied(name, args, kwargs.get("out", out))
        if copied is not None:
            target = copied[1]
            nbytes = target.numel() * target.element_size()
            section = self.sections[self.where()]
            section.all_bytes += nbytes
            if activation_shaped(target, self.tokens):
                section.activation_bytes += nbytes
                section.ops[name] += 1
        return out
