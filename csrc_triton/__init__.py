"""csrc_triton: anita's Triton kernels, each with a hand-written forward and backward.

Ops (see the kernel table in README.md for the math of each):
  nf4_quantize, nf4_dequantize   blockwise NF4, bit-identical to bitsandbytes
  nf4_matmul_op                  x @ W^T with W in NF4: fused decode+matmul kernel at small M,
                                 nf4_dequantize + cuBLAS at large M (nf4_dense; threshold
                                 ANITA_NF4_FUSED_MAX_M)
  lora_linear_op                 x W^T + scale * (drop(x) A^T) B^T, W in NF4
  rms_norm_op                    LLaMA RMSNorm
  rope_op                        rotary embedding of q and k (GQA, per-token positions)
  swiglu_op                      silu(gate) * up
  cross_entropy_op               loss sum and token count, online logsumexp over vocab
  fused_linear_cross_entropy     lm-head projection fused with cross-entropy
  token_logprobs                 lm-head projection fused with per-token log p(label)
  flash_attention                causal attention within packed documents (segment ids), GQA

Each op family's module ends with its RECORD (csrc_triton/records.py): its launchers
and where its reference, torch-mirror parity check, bench and sm_90 compile specs live.
The autograd ops carry an _op suffix so that no function shadows its module here
(csrc_triton.rms_norm is the module; csrc_triton.rms_norm_op the op).

Where kernels run: on a CUDA GPU when torch sees one, otherwise through the
Triton interpreter on the CPU. Override with ANITA_TRITON_MODE=interpret|compile
(or an explicit TRITON_INTERPRET=0/1), set before the first import.
How autotuned kernels choose their configs: ANITA_AUTOTUNE=full (default) or pruned
(one config per launch shape, no timing runs; csrc_triton/autotune_policy.py).
"""
from . import _runtime  # noqa: F401  (must run before any kernel module is imported)
from ._runtime import INTERPRETING, describe as runtime_description, set_poison_outputs
from .nf4 import NF4Weight
from .nf4_decode import nf4_dequantize
from .nf4_encode import nf4_quantize
from .nf4_matmul import nf4_matmul_op
from .lora_linear import lora_linear_op
from .rms_norm import rms_norm_op
from .rope import rope_cos_sin, rope_op
from .swiglu import swiglu_op
from .cross_entropy import cross_entropy_op
from .linear_loss import fused_linear_cross_entropy, token_logprobs
from .attention import document_bounds, flash_attention

__all__ = [
    "INTERPRETING", "runtime_description", "set_poison_outputs",
    "NF4Weight", "nf4_quantize", "nf4_dequantize", "nf4_matmul_op", "lora_linear_op",
    "rms_norm_op", "rope_op", "rope_cos_sin", "swiglu_op", "cross_entropy_op",
    "fused_linear_cross_entropy", "token_logprobs", "flash_attention", "document_bounds",
]
