"""anita_core: the LLaMA-3 NF4 QLoRA model, its data pipeline and its trainer."""
# Decide where Triton kernels run before anything else can import triton
# (see csrc_triton/_runtime.py).
import csrc_triton  # noqa: F401
