"""csrc_torch: every launcher of csrc_triton, as plain PyTorch on the same tensors.

The CPU path of anita (ANITA_BACKEND=torch, see anita_core/model/ops.py). Each
module mirrors one csrc_triton op family with the same low-level launcher names,
signatures, argument checks and return conventions, so the model's hand-written
backward runs unchanged on either backend (like llm.c's CPU reference beside its
CUDA file). Everything is computed in fp32, as the kernels do, and rounded once to
the output dtype. NF4 weights are dequantized in torch (csrc_torch.nf4), with a
byte-budgeted cache of dequantized fp32 weights.

Only NF4Weight, rope_cos_sin, document_bounds and the argument checks come from
csrc_triton (all plain torch); no Triton kernel ever runs from here.
"""
from .attention import document_bounds, flash_attention_backward, flash_attention_forward
from .linear_loss import (linear_cross_entropy_forward, linear_cross_entropy_forward_backward,
                          token_logprobs_backward, token_logprobs_forward)
from .lora_linear import (lora_linear_backward, lora_linear_forward, lora_linear_fused_backward,
                          lora_linear_fused_forward)
from .nf4 import dequant_cache_info, dequantize_fp32, nf4_quantize, set_dequant_cache_bytes
from .nf4_matmul import choose_path, dequantize_for_matmul
from .nf4_matmul import nf4_matmul_backward_input, nf4_matmul_forward
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rope import rope_backward, rope_cos_sin, rope_forward
from .swiglu import swiglu_backward, swiglu_forward

__all__ = [
    "nf4_quantize", "nf4_matmul_forward", "nf4_matmul_backward_input", "lora_linear_forward",
    "lora_linear_backward", "lora_linear_fused_forward", "lora_linear_fused_backward",
    "rms_norm_forward", "rms_norm_backward", "rope_forward",
    "rope_backward", "rope_cos_sin", "swiglu_forward", "swiglu_backward",
    "linear_cross_entropy_forward", "linear_cross_entropy_forward_backward",
    "token_logprobs_forward", "token_logprobs_backward",
    "dequantize_fp32", "dequant_cache_info", "set_dequant_cache_bytes",
    "choose_path", "dequantize_for_matmul",
    "document_bounds", "flash_attention_forward", "flash_attention_backward",
]
