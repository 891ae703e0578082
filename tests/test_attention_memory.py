"""A QLoRA training step on a packed 1024-token row allocates nothing O(S^2).

Every tensor torch creates during the step (kernel outputs from new_output, torch
temporaries, everything dispatched to ATen) is seen by a TorchDispatchMode that
records the largest one, in bytes. Any [S, S] tensor (a dense bool document mask,
SDPA's attention weights) takes at least S^2 bytes = 1 MiB; the largest tensors a
step needs are O(S): tokens x max(vocab, intermediate, heads x head dim) fp32 values,
1024 x 131 x 4 bytes = 0.51 MiB here (the logits of the fused loss, as the Triton
interpreter copies them). One layer with 2 query heads keeps the interpreter's
attention cost (per program) small."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anita_core.hf import load_model
from anita_core.lora import LoRAAdapters, LoRAConfig
from tests.model_factory import make_tiny_llama_dir

SEQ = 1024


class LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any ATen op returns, and its op."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), str(func)
        return result


def packed_row(seq: int, lengths=(1, 300, 1, 450)):
    """Documents of ``lengths`` and the rest of the row; positions restart per document."""
    lengths = list(lengths)
    lengths.append(seq - sum(lengths))
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return segments, positions


def step_inputs(tmp_path, seq: int, lengths=(1, 300, 1, 450)):
    """(one-layer tiny model with adapters, ids, targets, positions, segments) of one packed row."""
    model = load_model(make_tiny_llama_dir(tmp_path, num_layers=1, num_heads=2, num_kv_heads=1),
                       progress=False)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, seed=1), model.config)
    V = model.config.vocab_size
    segments, positions = packed_row(seq, lengths)
    return model, torch.randint(0, V, (1, seq)), torch.randint(0, V, (1, seq)), positions, segments


def test_training_step_at_1024_tokens_allocates_nothing_quadratic(tmp_path):
    model, ids, targets, positions, segments = step_inputs(tmp_path, SEQ)

    tracker = LargestAllocation()
    with tracker:
        loss_sum, n_tokens = model.train_step(ids, targets, positions, segments)
    assert torch.isfinite(loss_sum) and int(n_tokens) == SEQ
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.adapters.parameters())
    # the tracker saw the step's O(S) tensors (the fp32 hidden states at least) ...
    assert tracker.nbytes >= SEQ * model.config.hidden_size * 4, (tracker.nbytes, tracker.op)
    # ... and nothing as large as a bool [S, S]
    assert tracker.nbytes < SEQ * SEQ, (
        f"a training step allocated {tracker.nbytes} bytes in one tensor ({tracker.op}); "
        f"a bool [S, S] takes {SEQ * SEQ}")

    # the tracker does catch a quadratic tensor: the dense mask the model used to build
    check = LargestAllocation()
    with check:
        _ = segments[:, :, None] == segments[:, None, :]
    assert check.nbytes == SEQ * SEQ


# ------------------------------------------------------------------ the torch backend
TORCH_SEQ = 4096


def test_torch_backend_step_at_4096_tokens_allocates_nothing_quadratic(tmp_path):
    """The same check on the CPU path (csrc_torch.attention computes per query block over
    the keys of the block's documents): at 4,096 tokens a bool [S, S] is 16 MiB; a block's
    scores are [heads, 256, the keys of its documents] fp32."""
    from anita_core.model.ops import use_backend
    # four times 1, 300, 1, 450, then a document of 1,088 tokens
    model, ids, targets, positions, segments = step_inputs(tmp_path, TORCH_SEQ, (1, 300, 1, 450) * 4)
    tracker = LargestAllocation()
    with use_backend("torch"), tracker:
        loss_sum, n_tokens = model.train_step(ids, targets, positions, segments)
    assert torch.isfinite(loss_sum) and int(n_tokens) == TORCH_SEQ
    assert tracker.nbytes >= TORCH_SEQ * model.config.hidden_size * 4, (tracker.nbytes, tracker.op)
    assert tracker.nbytes < TORCH_SEQ * TORCH_SEQ, (tracker.nbytes, tracker.op)

    # the attention alone: its largest tensor is one block's scores; the 1,088-token
    # document's last block reads its 1,088 keys: 2 heads x 256 x 1,088 x 4 B = 2.1 MiB
    import csrc_torch
    q, k, v = (torch.randn(1, TORCH_SEQ, h, 24) for h in (2, 1, 1))
    bounds = csrc_torch.document_bounds(segments)
    tracker = LargestAllocation()
    with tracker:
        out, lse = csrc_torch.flash_attention_forward(q, k, v, bounds)
        csrc_torch.flash_attention_backward(torch.randn_like(out), q, k, v, out, lse, bounds)
    assert tracker.nbytes == 2 * 256 * 1088 * 4, (tracker.nbytes, tracker.op)
