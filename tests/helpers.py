"""Shared test utilities: element-wise comparison against a float64 reference,
and a record of the largest error seen per op (printed at the end of the run)."""
from __future__ import annotations

import collections

import torch

# op -> {"max_abs": float, "max_rel_fro": float, "max_used": float, "checks": int}; max_used is
# the largest |diff| / allowed over every element checked: how close the op came to failing
ERROR_LOG: dict = collections.defaultdict(
    lambda: {"max_abs": 0.0, "max_rel_fro": 0.0, "max_used": 0.0, "checks": 0})


def assert_close(op: str, name: str, actual: torch.Tensor, reference: torch.Tensor, *,
                 atol: float, rtol: float) -> None:
    """Check every element: |actual - reference| <= atol + rtol * |reference|.

    Both sides are compared in float64. A non-finite value in ``actual`` fails
    unless ``reference`` holds the very same value there (NaN never passes).
    Poisoned (never written) outputs are NaN, so they fail here too.
    """
    assert actual.shape == reference.shape, (
        f"{op}/{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    assert not torch.isnan(a).any(), (
        f"{op}/{name}: {int(torch.isnan(a).sum())} NaN elements (unwritten output?) "
        f"first at {tuple(torch.nonzero(torch.isnan(a))[0].tolist())}")
    bad_inf = torch.isinf(a) & (a != r)
    assert not bad_inf.any(), f"{op}/{name}: {int(bad_inf.sum())} unexpected inf elements"
    finite = torch.isfinite(r)
    diff = (a - r).abs().where(finite, torch.zeros_like(a))
    allowed = atol + rtol * r.abs().where(finite, torch.zeros_like(r))
    over = diff > allowed
    max_abs = float(diff.max()) if diff.numel() else 0.0
    ref_norm = float(r.where(finite, torch.zeros_like(r)).norm())
    rel_fro = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    entry = ERROR_LOG[op]
    entry["max_abs"] = max(entry["max_abs"], max_abs)
    entry["max_rel_fro"] = max(entry["max_rel_fro"], rel_fro)
    if diff.numel():
        # an exact check (allowed 0) that passes has diff 0 there: count it as 0 used
        used = torch.where(diff > 0, diff / allowed, torch.zeros_like(diff))
        entry["max_used"] = max(entry["max_used"], float(used.max()))
    entry["checks"] += 1
    if over.any():
        where = tuple(torch.nonzero(over)[0].tolist())
        raise AssertionError(
            f"{op}/{name}: {int(over.sum())}/{a.numel()} elements outside atol={atol:g} "
            f"rtol={rtol:g}; max |diff|={max_abs:.3e}; first at {where}: "
            f"got {a[where].item():.8g}, reference {r[where].item():.8g}")


def quantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` then widened to float64: the exact inputs a
    kernel running in ``dtype`` sees, so the reference starts from them too."""
    return t.to(dtype).to(torch.float64)


# A row stride that puts row 2 of a view past 2^31 - 1 elements from row 0.
FAR_ROWS = 2**30 + 64


def far_apart_rows(values: torch.Tensor, stride: int = FAR_ROWS) -> torch.Tensor:
    """``values`` [rows, width] copied into a view whose rows lie ``stride`` elements apart
    in one storage that is allocated but never touched outside those rows (the OS maps
    its pages lazily: a 4 GiB fp16 storage costs a few pages). With 3 rows or more the
    last offset passes 2^31 - 1, so only 64-bit kernel indexing reaches it: the
    launchers' wide-index path on a tensor of a few hundred elements."""
    rows, width = values.shape
    storage = torch.empty((rows - 1) * stride + width, dtype=values.dtype)
    view = storage.as_strided((rows, width), (stride, 1))
    view.copy_(values)
    return view


def bitsandbytes_functional():
    """bitsandbytes.functional, the byte-identity oracle. It is a declared
    dependency, so on the CPU machines (CI) a missing install is an error, not
    a skip; only a lent GPU machine, which ships without it (NOTES.md), skips."""
    import pytest
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        if torch.cuda.is_available():
            pytest.skip("bitsandbytes is not installed on this GPU machine", allow_module_level=True)
        raise
    return functional


def sample_rows(shape: str) -> list:
    """The rows of a bundled sample dataset (anita_core/assets/data)."""
    import json

    from anita_core.assets import sample_path
    with open(sample_path(shape), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
