"""The LLaMA-3 NF4 QLoRA model: embeddings -> decoder blocks -> norm -> fused loss.

Training never goes through torch.autograd across blocks: ``forward_hidden``
keeps each block's input (optionally in CPU memory), and ``backward_hidden``
walks the blocks in reverse calling their hand-written backward, which writes
the LoRA gradients into ``A.grad`` / ``B.grad``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from anita_core.model.attention import attention_bounds
from anita_core.model.block import BlockGeometry, BlockLoRA, block_backward, block_forward
from anita_core.model.config import ModelConfig
from anita_core.model.ops import (linear_cross_entropy_forward, linear_cross_entropy_forward_backward,
                                  rms_norm_backward, rms_norm_forward, rope_cos_sin,
                                  token_logprobs_backward, token_logprobs_forward)
from anita_core.model.weights import BaseWeights

IGNORE_INDEX = -100


@dataclass
class ForwardState:
    """What backward_hidden needs from forward_hidden: the block inputs, the final
    norm's statistics and the dropout generator's state before each block."""
    geometry: BlockGeometry
    block_inputs: List[torch.Tensor] = field(default_factory=list)
    generator_states: List[Optional[torch.Tensor]] = field(default_factory=list)
    generator_state_after: Optional[torch.Tensor] = None
    final_input: Optional[torch.Tensor] = None
    final_rstd: Optional[torch.Tensor] = None


class LayerHooks:
    """Called around each block while training and evaluating; the default does
    nothing. Subclasses add per-layer work without touching the block loop (e.g.
    gathering a sharded layer's weights before it runs, or starting the all-reduce
    of a layer's LoRA gradients as soon as its backward ends). ``phase`` is
    "forward" or "backward"; ``i`` is the layer index."""

    def before_layer(self, i: int, phase: str) -> None:
        pass

    def after_layer(self, i: int, phase: str) -> None:
        pass

    def after_backward(self) -> None:
        """Every block's backward has run (LoRA .grad complete on this process)."""


class QLoRALlama:
    """A LLaMA-family decoder with frozen NF4 projections and optional LoRA adapters.

    ``adapters`` is an anita_core.lora.LoRAAdapters (or None). When its ``enabled``
    flag is off the model is exactly the quantized base (DPO's reference model).
    """

    def __init__(self, config: ModelConfig, base: BaseWeights, adapters=None, *,
                 offload_block_inputs: bool = False, dropout_seed: int = 0):
        self.config = config
        self.base = base
        self.adapters = adapters
        self.offload_block_inputs = offload_block_inputs
        self.training = True
        self.device = base.embed_tokens.device
        self.dtype = base.embed_tokens.dtype
        self.dropout_generator = torch.Generator(device=self.device)
        self.dropout_generator.manual_seed(dropout_seed)
        self._rope_cache: Tuple[int, torch.Tensor, torch.Tensor] = (0, None, None)
        self.layer_hooks = LayerHooks()

    # ------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> "QLoRALlama":
        self.training = mode
        return self

    def eval(self) -> "QLoRALlama":
        return self.train(False)

    def rope_tables(self, n_positions: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions [0, n_positions), grown on demand (doubling)."""
        size, cos, sin = self._rope_cache
        if n_positions > size:
            size = max(n_positions, 2 * size, 256)
            c = self.config
            cos, sin = rope_cos_sin(c.head_dim, size, c.rope_theta, c.rope_scaling, device=self.device)
            self._rope_cache = (size, cos, sin)
        return cos, sin

    def geometry(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                 segment_ids: Optional[torch.Tensor]) -> BlockGeometry:
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=self.device).expand(B, S)
        for name, t in (("position_ids", position_ids), ("segment_ids", segment_ids)):
            if t is not None and tuple(t.shape) != (B, S):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(B, S)} like input_ids")
        position_ids = position_ids.contiguous()
        cos, sin = self.position_tables(position_ids)
        return BlockGeometry(B, S, position_ids, attention_bounds(segment_ids), cos, sin)

    def position_tables(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validate position ids once (one device sync per batch; the blocks' RoPE
        kernels then skip their own check) and return tables covering them."""
        low, high = (int(v) for v in torch.aminmax(position_ids))
        if low < 0:
            raise ValueError(f"position_ids must be >= 0, got {low}")
        return self.rope_tables(high + 1)

    def block_lora(self, layer: int) -> Optional[BlockLoRA]:
        ad = self.adapters
        if ad is None or not ad.enabled:
            return None
        weights = {}
        for name in self.base.layers[layer].projections:
            ab = ad.get(layer, name)
            if ab is not None:
                weights[name] = ab
        if not weights:
            return None
        return BlockLoRA(weights, ad.config.scale, ad.config.dropout, self.training,
                         self.dropout_generator)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids must lie in [0, {V}); got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        return self.base.embed_tokens[input_ids.reshape(-1)]

    def _uses_dropout(self) -> bool:
        ad = self.adapters
        return bool(self.training and ad is not None and ad.enabled and ad.config.dropout > 0)

    # ----------------------------------------------------------- forward/backward
    def forward_hidden(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                       segment_ids: Optional[torch.Tensor] = None, *,
                       for_backward: bool = True) -> Tuple[torch.Tensor, Optional[ForwardState]]:
        """Token ids [B, S] -> final normed hidden states [B*S, H] (and the state
        backward_hidden needs, when ``for_backward``)."""
        c = self.config
        geo = self.geometry(input_ids, position_ids, segment_ids)
        state = ForwardState(geo) if for_backward else None
        replay = for_backward and self._uses_dropout()
        h = self.embed(input_ids)
        for i, layer in enumerate(self.base.layers):
            if state is not None:
                state.block_inputs.append(self._stash(h))
                state.generator_states.append(self.dropout_generator.get_state() if replay else None)
            self.layer_hooks.before_layer(i, "forward")
            h = block_forward(h, layer, geo, c.num_attention_heads, c.num_key_value_heads,
                              c.rms_norm_eps, self.block_lora(i))
            self.layer_hooks.after_layer(i, "forward")
        hf, rstd = rms_norm_forward(h, self.base.norm, c.rms_norm_eps)
        if state is not None:
            state.final_input, state.final_rstd = h, rstd
            state.generator_state_after = self.dropout_generator.get_state() if replay else None
        return hf, state

    def backward_hidden(self, d_hidden: torch.Tensor, state: ForwardState) -> None:
        """Back-propagate dL/d(final normed hidden) through every block, adding the
        LoRA gradients into the adapters' .grad."""
        c = self.config
        dh, _ = rms_norm_backward(d_hidden.contiguous(), state.final_input, self.base.norm,
                                  state.final_rstd, False)
        for i in reversed(range(len(self.base.layers))):
            if state.generator_states[i] is not None:
                self.dropout_generator.set_state(state.generator_states[i])
            h_in = self._unstash(state.block_inputs[i])
            self.layer_hooks.before_layer(i, "backward")
            dh = block_backward(dh, h_in, self.base.layers[i], state.geometry, c.num_attention_heads,
                                c.num_key_value_heads, c.rms_norm_eps, self.block_lora(i))
            self.layer_hooks.after_layer(i, "backward")
            state.block_inputs[i] = None  # free as we go
        if state.generator_state_after is not None:
            self.dropout_generator.set_state(state.generator_state_after)
        self.layer_hooks.after_backward()

    def _stash(self, h: torch.Tensor) -> torch.Tensor:
        if self.offload_block_inputs and h.is_cuda:
            host = torch.empty(h.shape, dtype=h.dtype, device="cpu", pin_memory=True)
            return host.copy_(h, non_blocking=True)
        return h

    def _unstash(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.device, non_blocking=True)

    # ------------------------------------------------------------- entry points
    def train_step(self, input_ids: torch.Tensor, targets: torch.Tensor,
                   position_ids: Optional[torch.Tensor] = None,
                   segment_ids: Optional[torch.Tensor] = None, *,
                   grad_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch of causal-LM training.

        ``targets[b, t]`` is the token to predict at position t (already shifted;
        -100 = no loss). Adds grad_scale * d(loss_sum)/d(LoRA) into the adapters'
        .grad and returns (loss_sum fp32, n_tokens). Pass grad_scale = 1 / (target
        tokens of the whole accumulated batch) for exact token-mean normalization.
        """
        if tuple(targets.shape) != tuple(input_ids.shape):
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected "
                             f"{tuple(input_ids.shape)} like input_ids")
        hidden, state = self.forward_hidden(input_ids, position_ids, segment_ids)
        loss_sum, n_tokens, d_hidden, _ = linear_cross_entropy_forward_backward(
            hidden, self.base.output_embedding, targets.reshape(-1), grad_scale, IGNORE_INDEX)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {float(loss_sum)}; gradients were not applied")
        self.backward_hidden(d_hidden, state)
        return loss_sum, n_tokens

    @torch.no_grad()
    def loss(self, input_ids, targets, position_ids=None, segment_ids=None):
        """(loss_sum, n_tokens) without touching gradients (evaluation)."""
        hidden, _ = self.forward_hidden(input_ids, position_ids, segment_ids, for_backward=False)
        return linear_cross_entropy_forward(hidden, self.base.output_embedding,
                                            targets.reshape(-1), IGNORE_INDEX)

    def token_logprobs(self, input_ids, targets, position_ids=None, segment_ids=None, *,
                       for_backward: bool = True):
        """Per-token log p(target) [B, S] (0 where target is -100) and, when
        ``for_backward``, the state that ``logprobs_backward`` needs."""
        hidden, state = self.forward_hidden(input_ids, position_ids, segment_ids,
                                            for_backward=for_backward)
        flat_targets = targets.reshape(-1).contiguous()
        with torch.no_grad():
            logp, lse = token_logprobs_forward(hidden, self.base.output_embedding, flat_targets,
                                               IGNORE_INDEX)
        saved = (hidden, flat_targets, lse, state) if for_backward else None
        return logp.view(targets.shape), saved

    def logprobs_backward(self, d_logp: torch.Tensor, saved) -> None:
        """Back-propagate a per-token upstream gradient into the LoRA .grad."""
        hidden, flat_targets, lse, state = saved
        d_hidden, _ = token_logprobs_backward(d_logp.reshape(-1).float().contiguous(), hidden,
                                              self.base.output_embedding, flat_targets, lse,
                                              IGNORE_INDEX)
        self.backward_hidden(d_hidden, state)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
               segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full logits [B, S, V] in fp32, for tests and evaluation (materializes B*S*V)."""
        hidden, _ = self.forward_hidden(input_ids, position_ids, segment_ids, for_backward=False)
        logits = hidden.float() @ self.base.output_embedding.float().t()
        return logits.view(*input_ids.shape, -1)
