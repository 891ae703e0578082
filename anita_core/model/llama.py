"""The LLaMA-3 NF4 QLoRA model: embeddings -> decoder blocks -> norm -> fused loss.

Training never goes through torch.autograd across blocks. The layer loop, llm.c style:

    forward:   for each layer i:            h, saved[i] = block_forward(h, ..., policy[i])
    loss:      final norm, fused linear cross-entropy -> dh
    backward:  for each layer i, reversed:  dh = block_backward(dh, saved[i], ...)

``policy[i]`` (block.LayerPolicy, chosen per layer by the memory planner,
anita_core.memory) says what Saved keeps: the block's activations ("keep"), its input
("recompute") or its input off the device ("offload": the model hands it to its
activation_stash, model/stash.py, before the block's forward and takes it back before
the block's backward; anita_core.memory.offload keeps it in pinned host memory).
Every policy computes the same values in the same order, so the gradients do not
depend on it (bitwise in fp32, tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from anita_core.model.attention import attention_bounds, windowed_bounds
from anita_core.model.batch_facts import IGNORE_INDEX, BatchFacts
from anita_core.model.block import (Activations, BlockGeometry, BlockLoRA, LayerPolicy, Saved,
                                    block_backward, block_forward)
from anita_core.model.config import ModelConfig
from anita_core.model.ops import (linear_cross_entropy_forward, linear_cross_entropy_forward_backward,
                                  rms_norm_backward, rms_norm_forward, rope_cos_sin,
                                  token_logprobs_backward, token_logprobs_forward)
from anita_core.model.stash import ActivationStash, StashedInputs
from anita_core.model.weights import BaseWeights


@dataclass
class ForwardState:
    """What backward_hidden needs from forward_hidden: per block, its policy and Saved
    (an offloaded block's input waits in ``stashed``, its saved.h0 None), the final
    norm's statistics and the dropout generator's state after the forward."""
    geometry: BlockGeometry
    policies: List[LayerPolicy] = field(default_factory=list)
    stashed: Optional[StashedInputs] = None
    saved: List[Optional[Saved]] = field(default_factory=list)
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
    ``activation_stash`` holds the inputs of the layers whose policy is "offload"
    (model/stash.py; anita_core.memory.offload.HostOffload); None: no layer may offload.
    """

    def __init__(self, config: ModelConfig, base: BaseWeights, adapters=None, *,
                 activation_stash: Optional[ActivationStash] = None, dropout_seed: int = 0):
        self.config = config
        self.base = base
        self.adapters = adapters
        for layer, window in zip(base.layers, config.windows):
            layer.attention_window = window     # the family's sliding windows (families.py)
        self.activation_stash = activation_stash
        self.training = True
        self.device = base.embed_tokens.device
        self.dtype = base.embed_tokens.dtype
        self.dropout_generator = torch.Generator(device=self.device)
        self.dropout_generator.manual_seed(dropout_seed)
        self._rope_cache: Tuple[int, torch.Tensor, torch.Tensor] = (0, None, None)
        self.layer_hooks = LayerHooks()
        # per layer: a LayerPolicy (set_layer_strategies; a memory plan chooses them);
        # None: every layer recomputes
        self.layer_policies: Optional[List[LayerPolicy]] = None

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
                 segment_ids: Optional[torch.Tensor],
                 facts: Optional[BatchFacts] = None, bounds=None) -> BlockGeometry:
        """The batch's positions, RoPE tables and document bounds. The table size comes
        from the shape (no position_ids: 0 .. S-1) or from ``facts`` (counted on the
        host); only positions given without facts are read back to be checked.
        ``bounds``: attention bounds built elsewhere (packed DPO pairs: pair_rows),
        used instead of those of ``segment_ids``."""
        B, S = input_ids.shape
        for name, t in (("position_ids", position_ids), ("segment_ids", segment_ids)):
            if t is not None and tuple(t.shape) != (B, S):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(B, S)} like input_ids")
        if position_ids is None:
            position_ids = torch.arange(S, device=self.device).expand(B, S)
            cos, sin = self.rope_tables(max(S, 1))
        elif facts is not None:
            cos, sin = self.rope_tables(facts.position_bound)
        else:
            cos, sin = self.position_tables(position_ids)
        if bounds is None:
            bounds = attention_bounds(segment_ids)
        windows = {w: windowed_bounds(bounds, w, B, S, self.device)
                   for w in set(self.config.windows) if w is not None}
        return BlockGeometry(B, S, position_ids.contiguous(), bounds, cos, sin,
                             *self.head_counts(), window_bounds=windows)

    def head_counts(self) -> Tuple[int, int, float]:
        """BlockGeometry's model constants: query heads, key/value heads, the norms' eps."""
        c = self.config
        return c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps

    def position_tables(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validate position ids once (one device sync per batch; the blocks' RoPE
        kernels then skip their own check) and return tables covering them."""
        low, high = torch.stack(torch.aminmax(position_ids)).tolist()
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

    def embed(self, input_ids: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """Embedding rows of ``input_ids`` [B, S]; unless ``checked`` (on the host:
        batch_facts), the ids' range is read back and checked first (one sync)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        if input_ids.numel() and not checked:
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()
            if low < 0 or high >= V:
                raise ValueError(f"input_ids must lie in [0, {V}); got range [{low}, {high}]")
        return self.base.embed_tokens[input_ids.reshape(-1)]

    def _uses_dropout(self) -> bool:
        ad = self.adapters
        return bool(self.training and ad is not None and ad.enabled and ad.config.dropout > 0)

    def set_layer_strategies(self, strategies) -> None:
        """One policy per layer (a LayerPolicy, or a strategy name: "keep",
        "recompute", "offload"), or a single one for every layer; None restores the
        default (the memory planner, anita_core.memory, chooses them)."""
        n = len(self.base.layers)
        if strategies is None:
            self.layer_policies = None
            return
        if isinstance(strategies, (str, LayerPolicy)):
            strategies = [strategies] * n
        strategies = list(strategies)
        if len(strategies) != n:
            raise ValueError(f"layer strategies: got {len(strategies)} for {n} layers")
        names = tuple(a.value for a in Activations)
        for s in strategies:
            if not isinstance(s, LayerPolicy) and s not in names:
                raise ValueError(f"layer strategy {s!r} is not one of {', '.join(names)}")
        self.layer_policies = [LayerPolicy.of(s) for s in strategies]

    def policies(self) -> List[LayerPolicy]:
        if self.layer_policies is not None:
            return list(self.layer_policies)
        return [LayerPolicy.of("recompute")] * len(self.base.layers)

    def strategies(self) -> List[str]:
        """The layers' policies by name (what the memory planner reads)."""
        return [p.name for p in self.policies()]

    # ----------------------------------------------------------- forward/backward
    def forward_hidden(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                       segment_ids: Optional[torch.Tensor] = None, *, for_backward: bool = True,
                       facts: Optional[BatchFacts] = None, bounds=None,
                       ) -> Tuple[torch.Tensor, Optional[ForwardState]]:
        """Token ids [B, S] -> final normed hidden states [B*S, H] (and the state
        backward_hidden needs, when ``for_backward``). ``facts``: batch_facts of the
        CPU-side batch, so that nothing is read back from the device; ``bounds``: see
        ``geometry``."""
        c = self.config
        geo = self.geometry(input_ids, position_ids, segment_ids, facts, bounds)
        state = ForwardState(geo, self.policies()) if for_backward else None
        if state is not None and any(p.activations is Activations.OFFLOAD for p in state.policies):
            state.stashed = self._open_stash(state.policies)
        h = self.embed(input_ids, checked=facts is not None)
        for i, layer in enumerate(self.base.layers):
            policy = state.policies[i] if state is not None else None
            self.layer_hooks.before_layer(i, "forward")
            offload = policy is not None and policy.activations is Activations.OFFLOAD
            if offload:     # its copy off the device overlaps the block's forward
                state.stashed.stash(i, h)
            h, saved = block_forward(h, layer, geo, self.block_lora(i), policy)
            if saved is not None:
                if offload:
                    saved.h0 = None     # in the stash until its backward fetches it back
                state.saved.append(saved)
            self.layer_hooks.after_layer(i, "forward")
        hf, rstd = rms_norm_forward(h, self.base.norm, c.rms_norm_eps)
        if state is not None:
            state.final_input, state.final_rstd = h, rstd
            replay = self._uses_dropout()
            state.generator_state_after = self.dropout_generator.get_state() if replay else None
        return hf, state

    def _open_stash(self, policies: List[LayerPolicy]) -> StashedInputs:
        layers = [i for i, p in enumerate(policies) if p.activations is Activations.OFFLOAD]
        if self.activation_stash is None:
            raise ValueError(f"layers {layers} have the offload policy but the model has no "
                             "activation_stash to hold their inputs (hand one in: QLoRALlama("
                             "activation_stash=anita_core.memory.offload.HostOffload(device)))")
        return self.activation_stash.open(layers)

    def backward_hidden(self, d_hidden: torch.Tensor, state: ForwardState) -> None:
        """Back-propagate dL/d(final normed hidden) through every block, adding the
        LoRA gradients into the adapters' .grad."""
        offloaded = [i for i, p in enumerate(state.policies) if p.activations is Activations.OFFLOAD]
        if offloaded:                       # the top one arrives during the final norm's backward
            state.stashed.prefetch(offloaded[-1])
        dh, _ = rms_norm_backward(d_hidden.contiguous(), state.final_input, self.base.norm,
                                  state.final_rstd, False)
        # their last use: not held through every block's backward (a caller that hands
        # d_hidden over, like train_step, frees it here)
        del d_hidden
        state.final_input = state.final_rstd = None
        for i in reversed(range(len(self.base.layers))):
            saved, state.saved[i] = state.saved[i], None    # free as we go
            if state.policies[i].activations is Activations.OFFLOAD:
                saved.h0 = state.stashed.fetch(i)
                below = [j for j in offloaded if j < i]
                if below:                   # overlaps this layer's backward
                    state.stashed.prefetch(below[-1])
            self.layer_hooks.before_layer(i, "backward")
            dh = block_backward(dh, saved, self.base.layers[i], state.geometry, self.block_lora(i))
            self.layer_hooks.after_layer(i, "backward")
            saved = None
        if state.generator_state_after is not None:
            self.dropout_generator.set_state(state.generator_state_after)
        self.layer_hooks.after_backward()

    # ------------------------------------------------------------- entry points
    def train_step(self, input_ids: torch.Tensor, targets: torch.Tensor,
                   position_ids: Optional[torch.Tensor] = None,
                   segment_ids: Optional[torch.Tensor] = None, *, grad_scale: float = 1.0,
                   facts: Optional[BatchFacts] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch of causal-LM training.

        ``targets[b, t]`` is the token to predict at position t (already shifted;
        -100 = no loss). Adds grad_scale * d(loss_sum)/d(LoRA) into the adapters'
        .grad and returns (loss_sum fp32, n_tokens), both device tensors: a NaN or
        inf loss is not looked at here (that read would stall the host on a GPU),
        so its gradients are NaN too and the caller decides (the trainer checks
        the step's loss and gradient norm once, before any update). Pass grad_scale
        = 1 / (target tokens of the whole accumulated batch) for exact token-mean
        normalization, and ``facts`` (batch_facts of the CPU-side batch) to read
        nothing back from the device.
        """
        if tuple(targets.shape) != tuple(input_ids.shape):
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected "
                             f"{tuple(input_ids.shape)} like input_ids")
        hidden, state = self.forward_hidden(input_ids, position_ids, segment_ids, facts=facts)
        loss_sum, n_tokens, d_hidden, _ = linear_cross_entropy_forward_backward(
            hidden, self.base.output_embedding, targets.reshape(-1), grad_scale, IGNORE_INDEX,
            num_targets=_targets(facts))
        del hidden                      # the loss was its last use
        d_hidden = [d_hidden]           # handed over: freed after the final norm's backward
        self.backward_hidden(d_hidden.pop(), state)
        return loss_sum, n_tokens

    @torch.no_grad()
    def loss(self, input_ids, targets, position_ids=None, segment_ids=None, *, facts=None):
        """(loss_sum, n_tokens) without touching gradients (evaluation)."""
        hidden, _ = self.forward_hidden(input_ids, position_ids, segment_ids, for_backward=False,
                                        facts=facts)
        return linear_cross_entropy_forward(hidden, self.base.output_embedding,
                                            targets.reshape(-1), IGNORE_INDEX,
                                            num_targets=_targets(facts))

    def token_logprobs(self, input_ids, targets, position_ids=None, segment_ids=None, *,
                       for_backward: bool = True, facts: Optional[BatchFacts] = None):
        """Per-token log p(target) [B, S] (0 where target is -100) and, when
        ``for_backward``, the state that ``logprobs_backward`` needs."""
        hidden, state = self.forward_hidden(input_ids, position_ids, segment_ids,
                                            for_backward=for_backward, facts=facts)
        flat_targets = targets.reshape(-1).contiguous()
        with torch.no_grad():
            logp, lse = token_logprobs_forward(hidden, self.base.output_embedding, flat_targets,
                                               IGNORE_INDEX, num_targets=_targets(facts))
        saved = (hidden, flat_targets, lse, state, _targets(facts)) if for_backward else None
        return logp.view(targets.shape), saved

    def logprobs_backward(self, d_logp: torch.Tensor, saved) -> None:
        """Back-propagate a per-token upstream gradient into the LoRA .grad."""
        hidden, flat_targets, lse, state, num_targets = saved
        d_hidden, _ = token_logprobs_backward(d_logp.reshape(-1).float().contiguous(), hidden,
                                              self.base.output_embedding, flat_targets, lse,
                                              IGNORE_INDEX, num_targets=num_targets)
        self.backward_hidden(d_hidden, state)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
               segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full logits [B, S, V] in fp32, for tests and evaluation (materializes B*S*V)."""
        hidden, _ = self.forward_hidden(input_ids, position_ids, segment_ids, for_backward=False)
        logits = hidden.float() @ self.base.output_embedding.float().t()
        return logits.view(*input_ids.shape, -1)


def _targets(facts: Optional[BatchFacts]) -> Optional[int]:
    return None if facts is None else facts.num_targets
