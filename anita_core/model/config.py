"""The model configuration anita understands, read from (and written to) a
HuggingFace ``config.json``.

The families of model/families.py are accepted (``model_type`` llama, mistral,
qwen2 or qwen3: SiLU MLP, no MLP or o_proj bias) with plain RoPE or LLaMA-3.1
style "llama3" frequency scaling. What a family does beyond LLaMA (q/k/v bias,
per-head q/k norm, sliding windows) becomes fields here the block reads.
Anything else is refused with a ValueError that names the file and the field,
so a checkpoint we cannot run faithfully never loads silently.

RoPE settings come in two spellings and both are accepted:
  * older checkpoints (most of the hub, transformers 4.x): top-level
    ``rope_theta`` and ``rope_scaling`` ({"rope_type" or "type": ..., ...});
  * transformers 5.x ``save_pretrained``: one ``rope_parameters`` dict holding
    ``rope_type``, ``rope_theta`` and the scaling fields.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from anita_core.model.families import (FAMILIES, check_biases, family_hf_fields, family_of,
                                       layer_windows)
from anita_core.model.weights import PROJECTIONS

CONFIG_FILENAME = "config.json"

# Fields of rope_scaling for rope_type "llama3", all required.
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings")

# transformers' default when config.json gives no rope_theta (every family's)
DEFAULT_ROPE_THETA = 10000.0
_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads")


def _fail(source: str, field_name: str, problem: str) -> ValueError:
    if len(problem) > 240:       # a value quoted in it may be 4,000 digits or a whole object
        problem = f"{problem[:160]}...{problem[-60:]}"
    return ValueError(f"{source}: field '{field_name}' {problem}")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE; else {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (rope_theta lives above).
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, List[int]]] = 2
    max_position_embeddings: int = 2048
    model_type: str = "llama"            # a key of families.FAMILIES
    qkv_bias: bool = False               # q/k/v projections carry a frozen bias (qwen2)
    qk_norm: bool = False                # per-head RMSNorm on q and k before RoPE (qwen3)
    # attention window of each layer (None: full causal); None here: every layer full
    layer_windows: Optional[Tuple[Optional[int], ...]] = None
    # Where this config came from, for error messages; not part of equality.
    source: str = field(default="<ModelConfig>", compare=False, repr=False)

    def __post_init__(self):
        self.validate(self.source)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        """Build from a parsed config.json; ``source`` names the file in errors."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        family = family_of(d, source)
        _check_architecture(d, source)
        check_biases(d, family, source)
        values: Dict[str, Any] = {"model_type": family.model_type, "qkv_bias": family.qkv_bias,
                                  "qk_norm": family.qk_norm}
        for name in _REQUIRED_INTS:
            if d.get(name) is None:
                raise _fail(source, name, "is missing")
            values[name] = _as_int(d[name], source, name)
        heads = values["num_attention_heads"]
        kv = d.get("num_key_value_heads")
        values["num_key_value_heads"] = heads if kv is None else _as_int(kv, source,
                                                                          "num_key_value_heads")
        if d.get("head_dim") is not None:
            values["head_dim"] = _as_int(d["head_dim"], source, "head_dim")
        elif family.default_head_dim is not None:
            values["head_dim"] = family.default_head_dim
        else:
            if heads <= 0 or values["hidden_size"] % heads:
                raise _fail(source, "hidden_size",
                            f"= {values['hidden_size']} is not divisible by "
                            f"num_attention_heads = {heads} (and head_dim is absent)")
            values["head_dim"] = values["hidden_size"] // heads
        values["rms_norm_eps"] = _as_float(d.get("rms_norm_eps", family.default("rms_norm_eps")),
                                           source, "rms_norm_eps")
        values["rope_theta"], values["rope_scaling"] = _read_rope(d, source)
        windows = layer_windows(d, family, values["num_hidden_layers"], source)
        values["layer_windows"] = windows if any(w is not None for w in windows) else None
        tie = d.get("tie_word_embeddings", family.default("tie_word_embeddings"))
        if not isinstance(tie, bool):
            raise _fail(source, "tie_word_embeddings", f"must be true or false, got {tie!r}")
        values["tie_word_embeddings"] = tie
        values["bos_token_id"] = _optional_token(d.get("bos_token_id", family.default("bos_token_id")),
                                                 source, "bos_token_id", allow_list=False)
        values["eos_token_id"] = _optional_token(d.get("eos_token_id", family.default("eos_token_id")),
                                                 source, "eos_token_id", allow_list=True)
        values["max_position_embeddings"] = _as_int(
            d.get("max_position_embeddings", family.default("max_position_embeddings")),
            source, "max_position_embeddings")
        return cls(**values, source=source)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "ModelConfig":
        """Read ``path`` (a config.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> Dict[str, Any]:
        """A config.json body that transformers loads as this family's model class
        (LlamaForCausalLM for llama, ...: families.family_hf_fields).

        RoPE is written in both spellings (``rope_parameters`` for transformers
        5.x, top-level ``rope_theta``/``rope_scaling`` for 4.x); 5.x reads
        either and they agree.
        """
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling)
            rope_parameters["rope_theta"] = self.rope_theta
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, list) else self.eos_token_id
        body = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "max_position_embeddings": self.max_position_embeddings,
            "use_cache": True,
        }
        body.update(family_hf_fields(FAMILIES[self.model_type], self.windows, self.qkv_bias))
        return body

    # --------------------------------------------------------------- validation
    def validate(self, source: Optional[str] = None) -> None:
        """Raise ValueError naming ``source`` and the field if inconsistent."""
        source = source or self.source
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _fail(source, name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _fail(source, "num_key_value_heads",
                        f"= {self.num_key_value_heads} does not divide "
                        f"num_attention_heads = {self.num_attention_heads}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise _fail(source, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise _fail(source, "rope_theta", f"must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            _check_llama3_scaling(self.rope_scaling, source, "rope_scaling")
        if self.model_type not in FAMILIES:
            raise _fail(source, "model_type", f"is {self.model_type!r}; supported families: "
                                              f"{', '.join(FAMILIES)}")
        if self.layer_windows is not None:
            windows = self.layer_windows
            if len(windows) != self.num_hidden_layers or any(
                    w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0)
                    for w in windows):
                raise _fail(source, "layer_windows", f"must give None or a positive window for each "
                                                     f"of the {self.num_hidden_layers} layers, got {windows!r}")

    @property
    def windows(self) -> Tuple[Optional[int], ...]:
        """Each layer's attention window (None: full causal attention)."""
        return self.layer_windows or (None,) * self.num_hidden_layers

    @property
    def num_kv_groups(self) -> int:
        """Query heads sharing one key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> List[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]


def projection_shapes(config: ModelConfig) -> Dict[str, Tuple[int, int]]:
    """(out_features, in_features) of each projection weight, keyed by PROJECTIONS."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }
    assert tuple(shapes) == PROJECTIONS
    return shapes


# ---------------------------------------------------------------------- helpers
def _check_architecture(d: Dict[str, Any], source: str) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(source, "hidden_act", f"is {act!r}; only 'silu' is supported")
    tp = d.get("pretraining_tp", 1)
    if tp not in (None, 1):
        raise _fail(source, "pretraining_tp", f"is {tp!r}; only 1 is supported")


def _read_rope(d: Dict[str, Any], source: str) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(rope_theta, rope_scaling or None) from either spelling (module docstring)."""
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _fail(source, "rope_parameters", f"must be an object, got {params!r}")
        where = "rope_parameters"
        theta = params.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        where = "rope_scaling"
        theta = d.get("rope_theta", DEFAULT_ROPE_THETA)
        scaling = d.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise _fail(source, "rope_scaling", f"must be an object or null, got {scaling!r}")
    theta = _as_float(theta, source, "rope_theta")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        extra = sorted(set(scaling) - {"rope_type", "type"})
        if extra:
            raise _fail(source, where, f"has rope_type 'default' with unexpected fields {extra}")
        return theta, None
    if rope_type != "llama3":
        raise _fail(source, where, f"has rope_type {rope_type!r}; only 'default' "
                                   "and 'llama3' are supported")
    normalized = {"rope_type": "llama3"}
    for name in LLAMA3_ROPE_FIELDS:
        if scaling.get(name) is None:
            raise _fail(source, f"{where}.{name}", "is missing (needed by rope_type 'llama3')")
        normalized[name] = (_as_int if name == "original_max_position_embeddings"
                            else _as_float)(scaling[name], source, f"{where}.{name}")
    _check_llama3_scaling(normalized, source, where)
    return theta, normalized


def _check_llama3_scaling(s: Dict[str, Any], source: str, where: str) -> None:
    if s.get("rope_type") != "llama3":
        raise _fail(source, where, f"has rope_type {s.get('rope_type')!r}; expected 'llama3'")
    missing = [n for n in LLAMA3_ROPE_FIELDS if s.get(n) is None]
    if missing:
        raise _fail(source, f"{where}.{missing[0]}", "is missing (needed by rope_type 'llama3')")
    for name in LLAMA3_ROPE_FIELDS:
        if not s[name] > 0:
            raise _fail(source, f"{where}.{name}", f"must be positive, got {s[name]!r}")
    if s["low_freq_factor"] >= s["high_freq_factor"]:
        raise _fail(source, f"{where}.low_freq_factor",
                    f"= {s['low_freq_factor']} must be below high_freq_factor = "
                    f"{s['high_freq_factor']}")


def _as_int(value: Any, source: str, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, name, f"must be an integer, got {value!r}")
    return int(value)


def _as_float(value: Any, source: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, name, f"must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:        # an integer past a float's range
        raise _fail(source, name, f"is a number too large ({len(str(abs(value))):,} digits)") from None


def _optional_token(value: Any, source: str, name: str, *, allow_list: bool):
    if value is None:
        return None
    if allow_list and isinstance(value, list):
        return [_as_int(v, source, name) for v in value]
    return _as_int(value, source, name)
