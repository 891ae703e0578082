"""The model's hand-written backward (recompute per block, LoRA dropout masks
replayed from the saved generator state) against torch autograd through the
same model assembled from csrc_triton's public autograd Functions (the same
kernels, attention included).

Both sides run in fp32 and draw the same dropout masks in the same order; they
differ in the order partial gradients are summed (autograd adds the q/k/v and
gate/up contributions to a shared input in its own order), and the model's
cancellations (residual stream, RMSNorm backward, softmax backward) amplify
those roundings. Measured on 60 draws of this test (30 seeds x both dropouts,
2026-11-29): the two sides differ by up to 2.3e-5 of a tensor's max |grad|
with dropout 0.3 and 8.6e-6 with dropout off; against a float64 evaluation of
the same model (dropout off, 3 draws) each side errs by up to 3.4e-6. So REL is
1e-4 of the tensor's max, 4x the worst seen. A lost or re-drawn mask, a missing
term or a wrong scale moves gradients by orders of magnitude more."""
from __future__ import annotations

import pytest
import torch

from csrc_triton import (flash_attention, fused_linear_cross_entropy, lora_linear_op, nf4_matmul_op,
                         rms_norm_op, rope_op, swiglu_op)
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.hf import load_model
from tests.helpers import assert_close
from tests.model_factory import make_tiny_llama_dir

REL = 1e-4       # gradients, relative to each tensor's max |grad|: see module docstring
LOSS_REL = 1e-5  # the loss sum: one fp32 reduction apart (measured <= 7e-8 on 3 draws)


def autograd_loss_sum(model, ids, targets, generator):
    c, ad = model.config, model.adapters
    B, S = ids.shape
    Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    positions = torch.arange(S).expand(B, S).contiguous()
    cos, sin = model.rope_tables(S)
    h = model.base.embed_tokens[ids.reshape(-1)]
    for i, layer in enumerate(model.base.layers):
        def project(name, x):
            ab = ad.get(i, name)
            if ab is None:
                return nf4_matmul_op(x, layer.projections[name])
            return lora_linear_op(x, layer.projections[name], ab[0], ab[1], ad.scale,
                               ad.config.dropout, True, generator)
        x1 = rms_norm_op(h, layer.input_layernorm, c.rms_norm_eps)
        q, k, v = project("q_proj", x1), project("k_proj", x1), project("v_proj", x1)
        qr, kr = rope_op(q.view(B, S, Hq, D), k.view(B, S, Hkv, D), positions, cos, sin)
        attn = flash_attention(qr.contiguous(), kr.contiguous(), v.view(B, S, Hkv, D).contiguous())
        h = h + project("o_proj", attn.reshape(B * S, Hq * D))
        x2 = rms_norm_op(h, layer.post_attention_layernorm, c.rms_norm_eps)
        h = h + project("down_proj", swiglu_op(project("gate_proj", x2), project("up_proj", x2)))
    final = rms_norm_op(h, model.base.norm, c.rms_norm_eps)
    loss_sum, _ = fused_linear_cross_entropy(final, model.base.output_embedding, targets.reshape(-1))
    return loss_sum


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_hand_written_backward_equals_autograd(tmp_path, dropout):
    ckpt = make_tiny_llama_dir(tmp_path)
    model = load_model(ckpt, progress=False, dropout_seed=99)
    model.adapters = LoRAAdapters.init(
        LoRAConfig(r=4, alpha=8, dropout=dropout, seed=2,
                   target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
        model.config)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 9))
    targets = torch.randint(0, V, (2, 9))
    targets[1, :4] = -100

    generator_state = model.dropout_generator.get_state()
    loss_sum, _ = model.train_step(ids, targets, grad_scale=1.0)
    ours = [p.grad.clone() for p in model.adapters.parameters()]
    model.adapters.zero_grad()

    generator = torch.Generator().set_state(generator_state)
    reference_loss = autograd_loss_sum(model, ids, targets, generator)
    reference_loss.backward()
    assert_close("model_backward", "loss", loss_sum.reshape(1), reference_loss.detach().reshape(1),
                 atol=0.0, rtol=LOSS_REL)
    for (name, p), g in zip(model.adapters.named_parameters(), ours):
        scale = float(p.grad.abs().max())
        assert scale > 0, f"{name}: zero reference gradient"
        assert_close("model_backward", name, g, p.grad, atol=REL * scale, rtol=REL)

    if dropout > 0:   # the masks really were applied: without them the gradient differs
        model.adapters.zero_grad()
        model.eval()
        model.train_step(ids, targets, grad_scale=1.0)
        no_dropout = [p.grad for p in model.adapters.parameters()]
        assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(ours, no_dropout))
