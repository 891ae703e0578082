"""Model families as declarations: what a Mistral, Qwen2 or Qwen3 block does
differently from a LLaMA block, as data the block reads.

Every supported family runs the same decoder block (RMSNorm -> q/k/v -> RoPE ->
causal attention -> o -> RMSNorm -> SwiGLU MLP). What differs is declared here,
from each family's transformers model code and config class:

  llama    nothing extra.
  mistral  sliding-window attention in every layer when ``sliding_window`` is
           set (absent from config.json means transformers' default, 4096;
           null means full attention).
  qwen2    a bias on q, k and v (not on o): frozen base weights, added in the
           forward only. Sliding windows only where ``use_sliding_window`` is
           true, on the layers ``layer_types`` (or ``max_window_layers``) marks.
  qwen3    an RMSNorm over head_dim on every head of q and of k, before RoPE
           (``q_norm``, ``k_norm``; weights [head_dim]); head_dim set apart from
           hidden_size / num_heads (absent means transformers' default, 128);
           no biases; sliding windows as qwen2.

A new family is one more ``ModelFamily`` value in FAMILIES plus, if its block
does something none of these flags says, a new flag the block reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class ModelFamily:
    model_type: str                  # config.json's "model_type"
    architecture: str                # the transformers class, config.json's "architectures"
    qkv_bias: bool                   # q/k/v projections carry a (frozen) bias
    qk_norm: bool                    # per-head RMSNorm on q and k before RoPE
    # how config.json says which layers slide: "never", "every_layer" (mistral:
    # wherever sliding_window is set) or "layer_types" (qwen: use_sliding_window +
    # layer_types / max_window_layers)
    window_rule: str
    default_head_dim: Optional[int]  # None: hidden_size // num_attention_heads
    default_sliding_window: Optional[int]
    # defaults transformers' config class uses when config.json lacks the field
    defaults: Tuple[Tuple[str, Any], ...]

    def default(self, name: str) -> Any:
        return dict(self.defaults)[name]


_COMMON = (("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", False))

FAMILIES: Dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False,
                         window_rule="never", default_head_dim=None, default_sliding_window=None,
                         defaults=_COMMON + (("bos_token_id", 1), ("eos_token_id", 2),
                                             ("max_position_embeddings", 2048))),
    "mistral": ModelFamily("mistral", "MistralForCausalLM", qkv_bias=False, qk_norm=False,
                           window_rule="every_layer", default_head_dim=None,
                           default_sliding_window=4096,
                           defaults=_COMMON + (("bos_token_id", 1), ("eos_token_id", 2),
                                               ("max_position_embeddings", 131072))),
    "qwen2": ModelFamily("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False,
                         window_rule="layer_types", default_head_dim=None,
                         default_sliding_window=4096,
                         defaults=_COMMON + (("bos_token_id", None), ("eos_token_id", None),
                                             ("max_position_embeddings", 32768))),
    "qwen3": ModelFamily("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True,
                         window_rule="layer_types", default_head_dim=128,
                         default_sliding_window=4096,
                         defaults=_COMMON + (("bos_token_id", None), ("eos_token_id", None),
                                             ("max_position_embeddings", 32768))),
}
DEFAULT_MAX_WINDOW_LAYERS = 28      # Qwen2Config / Qwen3Config's default
SLIDING, FULL = "sliding_attention", "full_attention"


def family_of(d: Dict[str, Any], source: str) -> ModelFamily:
    """The family config.json ``d`` declares, or a one-line ValueError naming the supported ones."""
    model_type = d.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ValueError(f"{source}: field 'model_type' is {model_type!r}; supported families: "
                         f"{', '.join(FAMILIES)}")
    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list) or any(a != family.architecture for a in archs)):
        raise ValueError(f"{source}: field 'architectures' is {archs!r}; model_type "
                         f"{model_type!r} is read as ['{family.architecture}'] only")
    return family


def check_biases(d: Dict[str, Any], family: ModelFamily, source: str) -> None:
    """Refuse bias flags this family's block does not run (a bias on o_proj or the MLP)."""
    if d.get("mlp_bias", False):
        raise ValueError(f"{source}: field 'mlp_bias' is true; MLP projections with bias are "
                         "not supported")
    if family.model_type != "qwen2" and d.get("attention_bias", False):
        raise ValueError(f"{source}: field 'attention_bias' is true; for {family.model_type} it "
                         "puts a bias on o_proj too, which is not supported")


def layer_windows(d: Dict[str, Any], family: ModelFamily, num_layers: int,
                  source: str) -> Tuple[Optional[int], ...]:
    """The attention window of each layer (None: full causal attention), by the
    family's rule, as transformers' config class and model code read it."""
    full: Tuple[Optional[int], ...] = (None,) * num_layers
    if family.window_rule == "never":
        return full
    window = d.get("sliding_window", family.default_sliding_window)
    if family.window_rule == "layer_types":
        use = d.get("use_sliding_window", False)
        if not isinstance(use, bool):
            raise ValueError(f"{source}: field 'use_sliding_window' must be true or false, got {use!r}")
        if not use:
            window = None
    if window is None:
        return full
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"{source}: field 'sliding_window' must be a positive integer or null, "
                         f"got {window!r}")
    if family.window_rule == "every_layer":
        return (window,) * num_layers
    types = _layer_types(d, num_layers, source)
    return tuple(window if t == SLIDING else None for t in types)


def _layer_types(d: Dict[str, Any], num_layers: int, source: str) -> List[str]:
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"{source}: field 'max_window_layers' must be a non-negative "
                             f"integer, got {first!r}")
        return [SLIDING if i >= first else FULL for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in (SLIDING, FULL) for t in types)):
        raise ValueError(f"{source}: field 'layer_types' must list '{SLIDING}' or '{FULL}' for "
                         f"each of the {num_layers} layers")
    return list(types)


def family_hf_fields(family: ModelFamily, windows: Tuple[Optional[int], ...],
                     qkv_bias: bool) -> Dict[str, Any]:
    """The config.json fields that make transformers rebuild these windows and
    biases for ``family`` (written by ModelConfig.to_hf_dict)."""
    window = next((w for w in windows if w is not None), None)
    fields: Dict[str, Any] = {"architectures": [family.architecture],
                              "model_type": family.model_type}
    if family.model_type != "qwen2":        # Qwen2Config has none: q/k/v always carry one
        fields["attention_bias"] = bool(qkv_bias)
    if family.window_rule == "every_layer":
        fields["sliding_window"] = window
    elif family.window_rule == "layer_types":
        fields.update(use_sliding_window=window is not None,
                      sliding_window=window if window is not None else family.default_sliding_window,
                      max_window_layers=len(windows),
                      layer_types=[SLIDING if w is not None else FULL for w in windows])
    return fields
