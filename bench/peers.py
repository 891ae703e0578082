"""Optional peers, imported only when a case asks for them. A peer that is not
installed, or needs what this run lacks, raises Unavailable with the reason,
which ends up in the row's status ("skipped: ...") and in the printed notes."""
from __future__ import annotations

import functools
import os

import torch

from bench.cases import Unavailable


# Set by bench/gpu_session.sh for the peers it could not install, e.g.
# "bitsandbytes,liger-kernel: no wheels folder bench/wheels (bench/fetch_wheels.sh)".
NOT_INSTALLED_ENV = "ANITA_PEERS_NOT_INSTALLED"


def not_installed_note(distribution: str) -> str:
    """'; not installed: <why>' when the session named ``distribution`` as not installed."""
    text = os.environ.get(NOT_INSTALLED_ENV, "")
    names, _, why = text.partition(":")
    if distribution in [n.strip() for n in names.split(",")]:
        return f"; not installed: {why.strip()}"
    return ""


def require_gpu(ctx, who: str) -> None:
    if not ctx.on_gpu:
        raise Unavailable(f"{who} runs only on a CUDA GPU")


def require_not_smoke(ctx, who: str) -> None:
    if ctx.smoke:
        raise Unavailable(f"{who} is not run in smoke mode (compiling takes minutes on a CPU)")


def liger(ctx):
    """liger_kernel.transformers.functional (liger_rms_norm, liger_rope, ...)."""
    require_gpu(ctx, "Liger-Kernel")
    try:
        from liger_kernel.transformers import functional
    except ImportError as err:
        raise Unavailable(f"liger-kernel not importable ({err}){not_installed_note('liger-kernel')}"
                          ) from None
    return functional


def unsloth_kernels(ctx):
    """unsloth.kernels. Importing unsloth patches transformers globally, which is
    why only bench/kernels.py (no transformers model in the process) uses it."""
    require_gpu(ctx, "Unsloth")
    try:
        import unsloth.kernels as kernels
    except Exception as err:  # unsloth raises more than ImportError when it cannot start
        raise Unavailable(f"unsloth not importable ({type(err).__name__}: {err})") from None
    return kernels


def bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except Exception as err:
        raise Unavailable(f"bitsandbytes not importable ({type(err).__name__}: {err})"
                          f"{not_installed_note('bitsandbytes')}") from None
    return bitsandbytes


def compiled(ctx, fn):
    """torch.compile(fn) (one compiled wrapper per eager function; every new
    shape compiles once, during the untimed first call)."""
    require_not_smoke(ctx, "torch.compile")
    return _compiled(fn)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    # The sweep compiles each op for up to ~30 shapes x modes; the default limit
    # of 8 recompiles per function would silently fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    # The 'backward' mode re-runs the backward of one graph (retain_graph=True),
    # which compiled backwards with donated buffers refuse; donating only lets
    # the backward reuse saved-activation memory in place.
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=False)
