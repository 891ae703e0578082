"""Adapters on disk in PEFT's format, so `peft.PeftModel.from_pretrained` loads
what anita trains and anita loads what PEFT trains.

A PEFT LoRA adapter directory holds
  adapter_config.json        LoraConfig's fields (peft_type "LORA", r,
                             lora_alpha, target_modules, ...)
  adapter_model.safetensors  one tensor per matrix, keyed
                             base_model.model.<module path>.lora_{A,B}.weight
                             (PEFT 0.21 strips the adapter name "default").
PEFT also writes a README.md model card; it is not needed to load.

Saving is atomic: the files are written and fsynced in a fresh sibling
directory, which then takes the target's name. An existing adapter directory
is moved aside only after the new one is complete, and deleted after the
swap, so an interruption leaves either the old or the new adapter in place (a
crash exactly between the two renames leaves the old one under
``.<name>.old-*`` next to it).
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from anita_core.model.config import ModelConfig, projection_shapes
from anita_core.lora.adapters import LoRAAdapters, adapted_layers, peft_key
from anita_core.lora.config import LoRAConfig
from anita_core.model.weights import PROJECTIONS, projection_module_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Files an adapter directory may hold; save_peft refuses to replace a
# directory holding anything else, rather than delete it. manifest.json: the
# sizes and hashes the trainer records (anita_core/train/file_manifest.py).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", "manifest.json")

# LoraConfig fields that change what the adapter computes or how it attaches
# to the model in ways anita does not implement; each must be absent or
# null / false / empty in a config anita loads.
_UNSUPPORTED_FIELDS = (
    "use_dora", "use_qalora", "use_bdlora", "lora_bias", "fan_in_fan_out",
    "modules_to_save", "rank_pattern", "alpha_pattern", "exclude_modules",
    "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config",
    "velora_config", "megatron_config", "loftq_config",
)
# init_lora_weights values after which the saved A, B apply to the unmodified
# base weights (pissa, olora, loftq, ... rewrite the base weights at init).
_PLAIN_INITS = (True, False, "gaussian")


# -------------------------------------------------------------------- saving
def save_peft(adapters: LoRAAdapters, out_dir: Union[str, os.PathLike],
              base_model_name_or_path: Optional[str] = None,
              finish: Optional[Callable[[Path], Any]] = None) -> Path:
    """Write ``adapters`` to ``out_dir`` in PEFT's format, atomically; returns
    the directory. The tensors are written as fp32 on the CPU. ``finish`` is
    called with the temp directory once its files are complete, before it takes
    ``out_dir``'s name (the trainer writes its manifest there)."""
    if not isinstance(adapters, LoRAAdapters):
        raise ValueError(f"save_peft: adapters must be LoRAAdapters, got {type(adapters).__name__}")
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp_dir)
    try:
        _write_weights(adapters, tmp_dir / WEIGHTS_NAME)
        _write_config(peft_config_dict(adapters, base_model_name_or_path), tmp_dir / CONFIG_NAME)
        if finish is not None:
            finish(tmp_dir)
        _fsync_path(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def peft_config_dict(adapters: LoRAAdapters,
                     base_model_name_or_path: Optional[str] = None) -> Dict[str, Any]:
    """The adapter_config.json body: every LoraConfig field that bears on how
    PEFT rebuilds the adapter, with PEFT's spelling and value types."""
    c = adapters.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.use_rslora,
        "target_modules": list(c.target_modules),
        "layers_to_transform": None if c.layers_to_transform is None else list(c.layers_to_transform),
        "layers_pattern": None,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "target_parameters": None,
    }


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"save_peft: {out_dir} exists and is not a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ADAPTER_FILES)
    if foreign:
        raise ValueError(f"save_peft: {out_dir} holds {foreign[0]!r}, which is not an adapter "
                         f"file ({list(ADAPTER_FILES)}); refusing to replace that directory")


def _write_weights(adapters: LoRAAdapters, path: Path) -> None:
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in adapters.named_parameters()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file owner-only; an adapter is meant to be shared.
    os.chmod(path, 0o644)
    _fsync_path(path)


def _write_config(config: Dict[str, Any], path: Path) -> None:
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Give the complete ``new_dir`` the name ``out_dir``, replacing it."""
    if not out_dir.exists():
        os.rename(new_dir, out_dir)
        _fsync_path(out_dir.parent)
        return
    old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out_dir, old_dir)
    try:
        os.rename(new_dir, out_dir)
    except BaseException:
        os.rename(old_dir, out_dir)
        raise
    _fsync_path(out_dir.parent)
    shutil.rmtree(old_dir, ignore_errors=True)


# ------------------------------------------------------------------- loading
def load_peft(adapter_dir: Union[str, os.PathLike], model_config: ModelConfig,
              device="cpu") -> LoRAAdapters:
    """Read a PEFT LoRA adapter directory (saved by anita or by PEFT) for a model
    shaped like ``model_config``. Everything is checked before anything is
    built: a ValueError names the file and the offending field or key."""
    config_path, weights_path = _adapter_files(Path(adapter_dir))
    lora_config = lora_config_from_peft(_read_json(config_path), model_config, str(config_path))
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({e})") from e
    weights = _adapter_weights(tensors, lora_config, model_config, str(weights_path))
    return LoRAAdapters(lora_config, model_config,
                        {k: (a.to(device), b.to(device)) for k, (a, b) in weights.items()})


def check_peft(adapter_dir: Union[str, os.PathLike], model_config: ModelConfig) -> LoRAConfig:
    """Every check of load_peft that reads no tensor data: the files, the config, and
    each tensor's key, dtype and shape from the safetensors header (values, e.g. a NaN,
    are load_peft's to find). Cheap at any size: the commands check the adapter folders
    they are given with it before the base model loads."""
    config_path, weights_path = _adapter_files(Path(adapter_dir))
    lora_config = lora_config_from_peft(_read_json(config_path), model_config, str(config_path))
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            layout = {}
            for key in f.keys():
                view = f.get_slice(key)
                tag = view.get_dtype()
                layout[key] = (tuple(view.get_shape()), tag.startswith("F") or tag == "BF16", tag)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({e})") from e
    _check_layout(layout, lora_config, model_config, str(weights_path))
    return lora_config


def _adapter_files(adapter_dir: Path) -> Tuple[Path, Path]:
    if not adapter_dir.is_dir():
        raise ValueError(f"{adapter_dir} is not a directory")
    config_path = adapter_dir / CONFIG_NAME
    weights_path = adapter_dir / WEIGHTS_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path} is missing (not a PEFT adapter folder)")
    if not weights_path.is_file():
        hint = (" (only adapter_model.bin is there; anita reads safetensors, not pickles)"
                if (adapter_dir / "adapter_model.bin").exists() else "")
        raise ValueError(f"{weights_path} is missing{hint}")
    return config_path, weights_path


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as e:      # not JSON, not UTF-8, or an integer past 4,300 digits
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def lora_config_from_peft(d: Dict[str, Any], model_config: ModelConfig,
                          source: str = "<adapter_config>") -> LoRAConfig:
    """The LoRAConfig equivalent to a parsed PEFT adapter_config.json, or a
    ValueError naming ``source`` and the field anita cannot honour."""
    def fail(field_name: str, problem: str) -> ValueError:
        return ValueError(f"{source}: field '{field_name}' {problem}")

    if d.get("peft_type") != "LORA":
        raise fail("peft_type", f"is {d.get('peft_type')!r}; only 'LORA' adapters are supported")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise fail("task_type", f"is {d.get('task_type')!r}; expected 'CAUSAL_LM'")
    for name in _UNSUPPORTED_FIELDS:
        if d.get(name) not in (None, False, {}, [], ""):
            raise fail(name, f"is {d[name]!r}; anita supports only plain LoRA (this must be "
                             "null, false or empty)")
    if d.get("bias", "none") != "none":
        raise fail("bias", f"is {d['bias']!r}; only 'none' is supported")
    if d.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise fail("init_lora_weights", f"is {d['init_lora_weights']!r}; that init rewrites the "
                                        "base weights, which anita does not do")
    layers_pattern = d.get("layers_pattern")
    if layers_pattern not in (None, "", [], "layers", ["layers"]):
        raise fail("layers_pattern", f"is {layers_pattern!r}; a Llama model's layers are 'layers'")

    r = d.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise fail("r", f"must be a positive integer, got {r!r}")
    alpha = d.get("lora_alpha")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
            or alpha <= 0):
        raise fail("lora_alpha", f"must be a positive number, got {alpha!r}")
    dropout = d.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise fail("lora_dropout", f"must be a number in [0, 1), got {dropout!r}")
    use_rslora = d.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise fail("use_rslora", f"must be true or false, got {use_rslora!r}")

    targets, layers = _resolve_targets(d, model_config, fail)
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                      use_rslora=use_rslora, layers_to_transform=layers)


def _resolve_targets(d: Dict[str, Any], model_config: ModelConfig, fail):
    """(target projections, layers or None) that PEFT's module matching selects.

    PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists):
    - a string is a regular expression that must match the whole module path
      ("model.layers.3.self_attn.q_proj"); layers_to_transform is ignored;
    - "all-linear" (any case) means every linear layer but the output head,
      i.e. every projection; PEFT itself saves it resolved to a list;
    - a list entry selects a module whose path equals it or ends with
      "." + entry: "q_proj", "self_attn.q_proj" and
      "model.layers.0.self_attn.q_proj" are all valid; a list is then narrowed
      to layers_to_transform when that is set.
    Every list entry must select at least one projection (an entry naming
    lm_head, an embedding or a norm is refused), and the selection must be the
    same projections in every adapted layer, which is what LoRAConfig holds.
    """
    n = model_config.num_hidden_layers
    raw = d.get("target_modules")
    if isinstance(raw, str) and raw.lower() == "all-linear":
        raw = list(PROJECTIONS)
    if isinstance(raw, str):
        return _resolve_regex(raw, n, fail)
    if not isinstance(raw, list) or not raw:
        raise fail("target_modules", f"must be a non-empty list of module names, got {raw!r}")
    paths = {projection_module_path(layer, p): (layer, p) for layer in range(n) for p in PROJECTIONS}
    matched = set()
    for entry in raw:
        if not isinstance(entry, str) or not entry:
            raise fail("target_modules", f"holds {entry!r}; expected module names")
        hits = {where for path, where in paths.items()
                if path == entry or path.endswith("." + entry)}
        if not hits:
            raise fail("target_modules", f"names {entry!r}, which is not a projection anita can "
                                         f"adapt (expected names ending in one of {list(PROJECTIONS)})")
        matched |= hits
    raw_layers = d.get("layers_to_transform")
    if raw_layers not in (None, []):
        if isinstance(raw_layers, int) and not isinstance(raw_layers, bool):
            raw_layers = [raw_layers]
        if not isinstance(raw_layers, list) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in raw_layers):
            raise fail("layers_to_transform", f"is {raw_layers!r}; expected layer indices in [0, {n})")
        matched = {(layer, p) for layer, p in matched if layer in raw_layers}
        if not matched:
            raise fail("target_modules", f"selects no projection in layers_to_transform {raw_layers}")
    return _as_targets_and_layers(matched, n, raw, fail)


def _resolve_regex(pattern: str, n: int, fail):
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise fail("target_modules", f"= {pattern!r} is not a valid regular expression ({e})")
    matched = {(layer, p) for layer in range(n) for p in PROJECTIONS
               if regex.fullmatch(projection_module_path(layer, p))}
    if not matched:
        raise fail("target_modules", f"= {pattern!r} matches no projection of the model")
    return _as_targets_and_layers(matched, n, pattern, fail)


def _as_targets_and_layers(matched, n: int, raw, fail):
    """(projections, layers or None for all) of a set of (layer, projection)
    that must be their product."""
    layers = sorted({layer for layer, _ in matched})
    targets = [p for p in PROJECTIONS if any(q == p for _, q in matched)]
    if len(matched) != len(layers) * len(targets):
        raise fail("target_modules", f"= {raw!r} adapts different projections in different "
                                     "layers; anita needs the same projections in every adapted layer")
    return targets, (None if len(layers) == n else layers)


def _adapter_weights(tensors: Dict[str, torch.Tensor], lora_config: LoRAConfig,
                     model_config: ModelConfig, source: str) -> Dict[Tuple[int, str], Tuple]:
    """Check the file's tensors against the config and the model; return
    {(layer, projection): (A, B)} as fp32."""
    layout = {key: (tuple(t.shape), t.is_floating_point(), str(t.dtype)) for key, t in tensors.items()}
    expected = _check_layout(layout, lora_config, model_config, source)
    pairs: Dict[Tuple[int, str], list] = {}
    for key, (where, slot, _) in expected.items():
        t = tensors[key].to(torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}: key {key!r} holds non-finite values")
        pairs.setdefault(where, [None, None])[slot] = t
    return {k: (v[0], v[1]) for k, v in pairs.items()}


def _check_layout(layout: Dict[str, Tuple[Tuple[int, ...], bool, str]], lora_config: LoRAConfig,
                  model_config: ModelConfig, source: str) -> Dict[str, tuple]:
    """Raise unless ``layout`` (key -> (shape, is floating point, dtype name)) holds
    exactly the tensors the config and the model need; return key -> ((layer,
    projection), 0 for A / 1 for B, shape)."""
    shapes = projection_shapes(model_config)
    r = lora_config.r
    expected = {}
    for layer in adapted_layers(lora_config, model_config):
        for projection in lora_config.target_modules:
            out_features, in_features = shapes[projection]
            expected[peft_key(layer, projection, "A")] = ((layer, projection), 0, (r, in_features))
            expected[peft_key(layer, projection, "B")] = ((layer, projection), 1, (out_features, r))
    unexpected = sorted(set(layout) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} (the config "
                         f"adapts layers {list(adapted_layers(lora_config, model_config))} and "
                         f"targets {list(lora_config.target_modules)})")
    missing = [k for k in expected if k not in layout]
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]!r}")
    for key, (where, slot, shape) in expected.items():
        found, floating, dtype = layout[key]
        if not floating:
            raise ValueError(f"{source}: key {key!r} has dtype {dtype}, "
                             "expected a floating-point tensor")
        if len(found) != 2:
            raise ValueError(f"{source}: key {key!r} has shape {found}, expected {shape}")
        rank = found[0] if slot == 0 else found[1]
        if rank != r:
            raise ValueError(f"{source}: key {key!r} has rank {rank} (shape "
                             f"{found}) but the adapter config says r = {r}")
        if found != shape:
            raise ValueError(f"{source}: key {key!r} has shape {found}, but "
                             f"the model config needs {shape}: an adapter for a different base "
                             "model?")
    return expected
