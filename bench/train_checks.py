"""Is a timed training step training? The checks bench/train.py writes into every
throughput row, and bench/headline.py reads before it ranks one.

Gradients. After a row's timed steps (once, outside the timed loop: no host sync is
added to it) the LoRA gradients of the last step are read: ``grad_finite`` says whether
every element of every LoRA gradient is finite, ``grad_nonzero`` whether every B has a
non-zero gradient and, when the last step was not the first after the LoRA init, every
A too (with B = 0, dL/dA = 0 exactly, so a first step's A gradients are zero by
construction). A step that computes a loss and never back-propagates, or whose gradients
never reach the adapters, fails here.

Losses. Every measurement starts from the LoRA init (B = 0) and a fresh optimizer, so
its first step's loss (``loss_first``) is the loss before any update: it depends only on
the base weights and the rows. Both frameworks are built from the same NF4 codes and
scales (bench/train_models.py hands anita's weights to bitsandbytes bit for bit), the same
embedding, norms and lm_head, and train on the same rows, so the two compute the same
function and their SFT losses differ only by rounding. The bound (relative, on the mean
loss over the row's tokens), from a probabilistic rounding model (independent, zero-mean
rounding errors, Higham & Mary 2019):

    eps   = u * sqrt(K * 2L) + u32 * sqrt(2L * R + V)
    bound = LAMBDA * sqrt(2) * eps / sqrt(N)

u: the unit roundoff of the activations' dtype (bf16 2^-8, fp16 2^-11, fp32 2^-24);
K = 8 roundings of an activation on each of the 2L residual blocks of L layers (normed
input, projection outputs, attention or SwiGLU product, block output, residual add), so
u sqrt(2KL) is the relative rms error of the final hidden state of one framework; u32 =
2^-24 for the fp32 sums, R the longest reduction in a block (hidden, intermediate or
sequence length), V the vocabulary (the loss's log-sum-exp). A logit moves by about eps
times its size and a token's cross-entropy by about that much (the logits' rms is at most
the loss here: ~1 against ln V ~ 11.8 for the random NF4 model); the two frameworks'
independent errors give sqrt(2); the mean over the N = batch x (seq - 1) predicted tokens
divides by sqrt(N); LAMBDA = 4 standard deviations of that model. LLaMA-3-8B, 32 layers,
seq 2048 x batch 4, bf16: eps = 0.088, bound = 5.5e-3 (0.07 on a loss of ~12.3). It
catches a step that computes another objective (a sum for a mean, another scale or
shift, a stub, NaN), not a fine numerical fault: the session's gpu_tests step (run
before any timing) checks those against an fp32 reference at 8B layer shapes.

DPO rows are not compared across frameworks: before any update the policy equals the
reference, so a DPO loss is ln 2 whatever the model (up to the rounding of a margin
summed over the sequence); their gradients are checked like every row's.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -24}
FP32_U = 2.0 ** -24
ROUNDINGS_PER_BLOCK = 8
LAMBDA = 4.0
# What makes two rows the same measurement (their ratio and their losses comparable).
SAME_MEASUREMENT = ("device", "model", "layers", "seq_len", "batch", "dtype", "lora_r")
CHECK_COLUMNS = ["loss_first", "loss_bound", "loss_check", "grad_finite", "grad_nonzero",
                 "grad_norm"]


def sft_loss_bound(dtype: str, layers: int, seq: int, batch: int, *, hidden: int,
                   intermediate: int, vocab: int) -> float:
    """The relative bound above for two frameworks' SFT losses before any update."""
    u = UNIT_ROUNDOFF[dtype]
    blocks = 2 * layers
    eps = (u * math.sqrt(ROUNDINGS_PER_BLOCK * blocks)
           + FP32_U * math.sqrt(blocks * max(hidden, intermediate, seq) + vocab))
    tokens = max(1, batch * (seq - 1))
    return LAMBDA * math.sqrt(2.0) * eps / math.sqrt(tokens)


def _float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mismatch(a: dict, b: dict, keys: Sequence[str] = SAME_MEASUREMENT) -> str:
    """'' when rows ``a`` and ``b`` agree on every key, else which keys differ and how."""
    differ = [f"{k} {a.get(k, '')!s} vs {b.get(k, '')!s}" for k in keys
              if str(a.get(k, "")) != str(b.get(k, ""))]
    return "; ".join(differ)


def compare_losses(row: dict, other: dict) -> Tuple[Optional[bool], str]:
    """(agree, text) for two frameworks' rows of one measurement: None when they cannot be
    compared (DPO, other shapes, a loss missing), else whether their first-step losses
    agree within the bound (the smaller of the two rows' ``loss_bound``)."""
    if row.get("measurement") != "throughput" or other.get("measurement") != "throughput":
        return None, "DPO: not compared (ln 2 before any update whatever the model)"
    differ = mismatch(row, other)
    if differ:
        return None, f"not compared with {other.get('framework')}: {differ}"
    a, b = _float(row.get("loss_first")), _float(other.get("loss_first"))
    bounds = [x for x in (_float(row.get("loss_bound")), _float(other.get("loss_bound"))) if x]
    if a is None or b is None or not bounds:
        return None, f"not compared with {other.get('framework')}: a first-step loss is missing"
    if not (math.isfinite(a) and math.isfinite(b)):
        return False, f"first-step loss {a:g} vs {other.get('framework')}'s {b:g}"
    rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
    verdict = "<=" if rel <= min(bounds) else ">"
    text = (f"first-step loss {a:.7g} vs {other.get('framework')}'s {b:.7g}: relative "
            f"difference {rel:.2g} {verdict} bound {min(bounds):.2g}")
    return rel <= min(bounds), text


def own_loss_check(row: dict, references: Iterable[dict]) -> str:
    """The ``loss_check`` cell of a throughput row: its first-step loss must be finite and
    agree with any other framework's row of the same measurement in ``references``."""
    loss = _float(row.get("loss_first"))
    if loss is None or not math.isfinite(loss):
        return f"failed: first-step loss {row.get('loss_first')!r} is not a finite number"
    others = [r for r in references if r.get("framework") != row.get("framework")
              and r.get("measurement") == row.get("measurement") and not mismatch(row, r)
              and _float(r.get("loss_first")) is not None]
    if row.get("measurement") != "throughput":
        return "ok: finite; DPO: not compared (ln 2 before any update whatever the model)"
    if not others:
        return "ok: finite; no other framework's row of this measurement to compare with"
    other = next((r for r in others if r.get("framework") == "anita"), others[0])
    agree, text = compare_losses(row, other)
    return f"{'ok' if agree else 'failed'}: {text}"


def grad_check(named: Iterable[Tuple[str, object]], first_step: bool) -> Dict[str, object]:
    """grad_finite, grad_nonzero and grad_norm of the LoRA gradients in ``named`` (name,
    parameter): read once, with one transfer to the host. ``first_step``: the last step
    was the first after the LoRA init, so A's gradients are zero by construction."""
    import torch
    kinds: List[str] = []
    flags, norms, missing = [], [], []
    for name, param in named:
        kind = "A" if "lora_A" in name else ("B" if "lora_B" in name else "?")
        grad = getattr(param, "grad", None)
        if grad is None:
            missing.append(name)
            continue
        kinds.append(kind)
        flags.append(torch.stack([torch.isfinite(grad).all(), (grad != 0).any()]))
        norms.append(grad.detach().float().norm())
    if not flags:
        return {"grad_finite": "no: no LoRA gradient at all", "grad_nonzero": "no: no LoRA "
                "gradient at all", "grad_norm": None}
    host = torch.stack(flags).cpu().tolist()
    norm = float(torch.stack(norms).norm().cpu())
    bad = sum(1 for finite, _ in host if not finite)
    counts = {k: (sum(1 for kk, (_, nz) in zip(kinds, host) if kk == k and nz),
                  kinds.count(k)) for k in ("B", "A")}
    need = ("B",) if first_step else ("B", "A")
    nonzero_ok = not missing and all(counts[k][0] == counts[k][1] > 0 for k in need)
    detail = ", ".join(f"{n}/{t} {k}" for k, (n, t) in counts.items() if t)
    if missing:
        detail += f", {len(missing)} without a gradient (e.g. {missing[0]})"
    if first_step:
        detail += " (A zero by construction at a first step)"
    finite = "yes" if not bad and not missing else (
        f"no: {bad} of {len(host)} gradients hold NaN or inf" if bad else
        f"no: {len(missing)} LoRA tensors have no gradient")
    return {"grad_finite": finite, "grad_nonzero": f"{'yes' if nonzero_ok else 'no'}: {detail}",
            "grad_norm": norm}


def failed_checks(row: dict) -> List[str]:
    """What a row's checks say is wrong ([] when its step trains); a row written before
    these columns existed has none and says so."""
    if "grad_finite" not in row:
        return ["no training checks in this row (written by an older bench/train.py)"]
    problems = []
    if not str(row.get("grad_finite", "")).startswith("yes"):
        problems.append(f"grad_finite {row.get('grad_finite') or 'missing'}")
    if not str(row.get("grad_nonzero", "")).startswith("yes"):
        problems.append(f"grad_nonzero {row.get('grad_nonzero') or 'missing'}")
    if not str(row.get("loss_check", "")).startswith("ok"):
        problems.append(f"loss_check {row.get('loss_check') or 'missing'}")
    return problems
