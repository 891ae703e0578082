"""The package's layers only import downwards.

    csrc_triton  <-  csrc_torch (the same launchers in plain torch)
    csrc_triton, csrc_torch  <-  anita_core.model  <-  anita_core.lora  <-  anita_core.hf  <-  anita_core.train
                                                                             <-  anita_core.eval (may use train)
                                           anita_core.data (beside the model: knows no model)

Every import statement of every module is read with ``ast`` (lazy imports
inside functions included), so an upward import fails here even when the
module that holds it is never executed by another test.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]

# layer -> the packages its modules may import (its own included)
ALLOWED = {
    "csrc_triton": {"csrc_triton"},
    "csrc_torch": {"csrc_torch", "csrc_triton"},
    "anita_core.model": {"csrc_triton", "csrc_torch", "anita_core.model"},
    "anita_core.lora": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora"},
    "anita_core.hf": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora",
                      "anita_core.hf"},
    "anita_core.data": {"anita_core.data", "anita_core.assets"},
    # assets/__init__ is path constants; its build_* scripts rebuild the bundled
    # tokenizer, data and tiny model, so they may use the model and data layers.
    "anita_core.assets": {"anita_core.assets", "anita_core.data", "anita_core.model", "csrc_triton"},
    "anita_core.train": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora", "anita_core.hf",
                         "anita_core.data", "anita_core.assets", "anita_core.train"},
    # evaluation (lm-eval): loads models and adapters; its command reuses train's flag helpers
    "anita_core.eval": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora", "anita_core.hf",
                        "anita_core.data", "anita_core.assets", "anita_core.train", "anita_core.eval"},
}
PROJECT_PACKAGES = ("csrc_triton", "csrc_torch", "anita_core")


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to ('anita_core.model.block' -> 'anita_core.model')."""
    parts = module.split(".")
    if parts[0] in ("csrc_triton", "csrc_torch"):
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "anita_core"


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[Tuple[int, str]]:
    """(line, absolute dotted name) of every project import in ``source``."""
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` may name a submodule: count it as pkg.sub
            names = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES:
                yield node.lineno, name


def violations(source: str, module: str, is_package: bool = False) -> List[str]:
    layer = layer_of(module)
    allowed = ALLOWED.get(layer)
    if allowed is None:           # anita_core/__init__.py: imports csrc_triton only
        allowed = {"csrc_triton"}
    found = []
    for line, name in imported_modules(source, module, is_package):
        target = layer_of(name)
        if target == "anita_core" and name == "anita_core":
            continue              # the root package itself (decides the Triton mode)
        if target not in allowed:
            found.append(f"{module}:{line} imports {name} ({layer} may import only {sorted(allowed)})")
    return found


def project_modules() -> Iterator[Tuple[Path, str, bool]]:
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield path, ".".join(parts), is_package


def test_every_layer_imports_only_downwards():
    problems = []
    checked = 0
    for path, module, is_package in project_modules():
        problems += violations(path.read_text(encoding="utf-8"), module, is_package)
        checked += 1
    assert checked > 40, f"only {checked} modules found: is the tree where the test expects it?"
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_every_subpackage_has_a_layer():
    """A new subpackage must be placed in ALLOWED, or it would be checked by nobody."""
    for sub in sorted(p for p in (ROOT / "anita_core").iterdir()
                      if p.is_dir() and (p / "__init__.py").exists()):
        assert f"anita_core.{sub.name}" in ALLOWED, f"anita_core/{sub.name} has no layer in ALLOWED"


def test_the_checker_catches_upward_and_relative_imports():
    # the checker itself must be able to fail
    assert violations("from anita_core.train.trainer import Trainer\n", "anita_core.model.block")
    assert violations("import anita_core.model.llama\n", "csrc_triton.rope")
    assert violations("from csrc_torch import rope_forward\n", "csrc_triton.rope")
    assert violations("from anita_core.model import ops\n", "csrc_torch.rope")
    assert not violations("from csrc_triton.rope import rope_cos_sin\n", "csrc_torch.rope")
    assert not violations("from csrc_torch import rope_forward\n", "anita_core.model.ops")
    assert violations("def f():\n    from ..train import cli\n", "anita_core.model.llama")
    assert violations("from anita_core.model import QLoRALlama\n", "anita_core.data.sft")
    assert violations("from anita_core import train\n", "anita_core.hf.load")
    assert not violations("from ..model.config import ModelConfig\n", "anita_core.lora.adapters")
    assert not violations("from . import peft\n", "anita_core.lora", is_package=True)
