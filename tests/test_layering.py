"""The package's layers only import downwards.

    csrc_triton  <-  csrc_torch (the same launchers in plain torch)
    csrc_triton, csrc_torch  <-  anita_core.model  <-  anita_core.lora  <-  anita_core.hf  <-  anita_core.train
                                                                             <-  anita_core.recipes (sft, dpo: above train)
                                                                             <-  anita_core.eval (may use train)
                                                                             <-  anita_core.plot (the curves' command)
                                           anita_core.data (beside the model: knows no model)
    anita_core.model  <-  anita_core.memory (the memory policy)  <-  anita_core.train, anita_core.eval
                                           anita_core.cli (the commands' shared flags, errors and environment:
                                                           below train, eval and recipes; knows no model)

Every import statement of every module is read with ``ast`` (lazy imports
inside functions included), so an upward import fails here even when the
module that holds it is never executed by another test.

Also: no two modules import each other, directly or round a longer circle (the
same import statements, as a graph of modules), and no module of csrc_triton,
csrc_torch or anita_core is longer than SIZE_LIMIT lines (split it by concern).
Imports through importlib.import_module are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

# layer -> the packages its modules may import (its own included)
ALLOWED = {
    "csrc_triton": {"csrc_triton"},
    "csrc_torch": {"csrc_torch", "csrc_triton"},
    "anita_core.model": {"csrc_triton", "csrc_torch", "anita_core.model"},
    "anita_core.lora": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora"},
    "anita_core.hf": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora",
                      "anita_core.hf"},
    "anita_core.data": {"anita_core.data"},
    # memory policy (planner, replay, budgets): reads the model's declarations, chooses
    # each layer's policy; the model takes that value and never imports it
    "anita_core.memory": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.memory"},
    # assets/__init__ is path constants; its build_* scripts rebuild the bundled
    # tokenizer, data and tiny model, so they may use the model and data layers.
    "anita_core.assets": {"anita_core.assets", "anita_core.data", "anita_core.model", "csrc_triton"},
    # the commands' shared flag types, flags, one-line errors and environment variables:
    # the bundled model's path (assets) and the Triton mode (csrc_triton) only
    "anita_core.cli": {"anita_core.cli", "anita_core.assets", "csrc_triton"},
    "anita_core.train": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora", "anita_core.hf",
                         "anita_core.data", "anita_core.assets", "anita_core.cli", "anita_core.memory", "anita_core.train"},
    # one module per training stage (config, data builder call, objective) and their
    # command lines (cli_*.py): above train; nothing below imports it
    "anita_core.recipes": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora",
                           "anita_core.hf", "anita_core.data", "anita_core.assets", "anita_core.cli",
                           "anita_core.memory", "anita_core.train", "anita_core.recipes"},
    # evaluation (lm-eval): loads models and adapters; its command uses the shared cli helpers
    # and train's input checks
    "anita_core.eval": {"csrc_triton", "csrc_torch", "anita_core.model", "anita_core.lora", "anita_core.hf",
                        "anita_core.data", "anita_core.assets", "anita_core.cli", "anita_core.memory",
                        "anita_core.train",
                        "anita_core.eval"},
    # python -m anita_core.plot RUN_DIR (one module): the command over train's curves.py
    "anita_core.plot": {"anita_core.train", "anita_core.plot"},
}
PROJECT_PACKAGES = ("csrc_triton", "csrc_torch", "anita_core")
SIZE_LIMIT = 450          # lines per module of PROJECT_PACKAGES


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


def test_data_knows_no_assets():
    # the bundled tokenizer's folder is passed in by the caller (the asset builders, tests)
    assert "anita_core.assets" not in ALLOWED["anita_core.data"]
    assert violations("from anita_core.assets import TOKENIZER_DIR\n", "anita_core.data.tokenizer")
    assert violations("def f():\n    from ..assets import TOKENIZER_DIR\n",
                      "anita_core.data.tokenizer")
    assert not violations("from anita_core.data import load_tokenizer\n",
                          "anita_core.assets.build_base_model")


# ---------------------------------------------------------------------------------------
# module size
# ---------------------------------------------------------------------------------------

def line_count(source: str) -> int:
    """Lines of a module, as ``wc -l`` counts them in a file that ends with a newline."""
    return len(source.splitlines())


def oversized(sizes: Mapping[str, int], limit: int = SIZE_LIMIT) -> List[str]:
    """'<file>: <n> lines' for every file of ``sizes`` (file -> lines) over ``limit``,
    the longest first."""
    longest_first = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
    return [f"{name}: {n} lines" for name, n in longest_first if n > limit]


def test_no_module_over_the_size_limit():
    sizes = {path.relative_to(ROOT).as_posix(): line_count(path.read_text(encoding="utf-8"))
             for path, _, _ in project_modules()}
    assert len(sizes) > 40, f"only {len(sizes)} modules found: is the tree where expected?"
    problems = oversized(sizes)
    assert not problems, (f"modules over {SIZE_LIMIT} lines (split each by concern):\n"
                          + "\n".join(problems))


def test_the_size_check_names_each_offender():
    assert line_count("x = 1\n" * 451) == 451 and line_count("") == 0
    assert oversized({"csrc_triton/ok.py": 450, "csrc_triton/big.py": 451,
                      "anita_core/model/bigger.py": 742}) == [
        "anita_core/model/bigger.py: 742 lines", "csrc_triton/big.py: 451 lines"]
    assert oversized({"csrc_torch/rope.py": 42}) == []


# ---------------------------------------------------------------------------------------
# import cycles
# ---------------------------------------------------------------------------------------

def import_graph(sources: Mapping[str, Tuple[str, bool]]) -> Dict[str, Set[str]]:
    """module -> the modules of ``sources`` (module -> (source, is_package)) it imports,
    lazy imports included. An import counts as the deepest module it names that is in
    ``sources``: ``from pkg import sub`` is pkg.sub when that is a module, else pkg (a
    name defined in pkg/__init__.py). A module importing itself is no edge."""
    graph: Dict[str, Set[str]] = {}
    for module, (source, is_package) in sources.items():
        targets = set()
        for _, name in imported_modules(source, module, is_package):
            while name and name not in sources:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def import_cycles(graph: Mapping[str, Set[str]]) -> List[List[str]]:
    """One circle [a, b, ..., a] for each group of modules that import each other (a
    strongly connected component of ``graph`` with more than one module): the shortest
    one through the group's first module in sorted order."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[Set[str]] = []

    def visit(node: str) -> None:            # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        start = min(group)
        paths = {start: [start]}             # breadth first, inside the group, back to start
        frontier = [start]
        while frontier and len(paths[start]) == 1:
            following = []
            for node in frontier:
                for target in sorted(graph.get(node, ())):
                    if target == start and len(paths[start]) == 1:
                        paths[start] = paths[node] + [start]
                    elif target in group and target not in paths:
                        paths[target] = paths[node] + [target]
                        following.append(target)
            frontier = following
        cycles.append(paths[start])
    return sorted(cycles)


def test_no_import_cycles():
    sources = {module: (path.read_text(encoding="utf-8"), is_package)
               for path, module, is_package in project_modules()}
    graph = import_graph(sources)
    assert sum(map(len, graph.values())) > 100, "too few imports found: is the graph built?"
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other:\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_catches_circles():
    # the checker itself must be able to fail: a lazy import closes the circle
    lazy = "def f():\n    from anita_core.data.streaming import g\n"
    two = {"anita_core.data.loading": (lazy, False),
           "anita_core.data.streaming": ("from anita_core.data.loading import Table\n", False),
           "anita_core.data.table": ("import re\n", False)}
    assert import_cycles(import_graph(two)) == [
        ["anita_core.data.loading", "anita_core.data.streaming", "anita_core.data.loading"]]
    # round three modules, through a package __init__ and a relative import
    three = {"csrc_triton": ("from .nf4 import NF4Weight\n", True),
             "csrc_triton.nf4": ("from . import nf4_bnb\n", False),
             "csrc_triton.nf4_bnb": ("from csrc_triton import nf4_quantize\n", False)}
    assert import_cycles(import_graph(three)) == [
        ["csrc_triton", "csrc_triton.nf4", "csrc_triton.nf4_bnb", "csrc_triton"]]
    # `from pkg import sub` is the submodule, not pkg/__init__: no circle here
    fine = {"csrc_triton": ("from .nf4 import NF4Weight\n", True),
            "csrc_triton.nf4": ("from csrc_triton import nf4_codebook\n", False),
            "csrc_triton.nf4_codebook": ("import torch\n", False)}
    assert import_graph(fine)["csrc_triton.nf4"] == {"csrc_triton.nf4_codebook"}
    assert import_cycles(import_graph(fine)) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [
        ["a", "b", "c", "a"]]


def test_recipes_sit_above_train_and_the_cli_helpers_below():
    assert violations("from anita_core.recipes.sft import run\n", "anita_core.train.trainer")
    assert violations("def f():\n    from anita_core.recipes import dpo\n", "anita_core.eval.cli")
    assert violations("from anita_core.train.trainer import Trainer\n", "anita_core.cli.common")
    assert violations("from anita_core.model import QLoRALlama\n", "anita_core.cli.flag_types")
    assert not violations("from anita_core.cli.common import usage_error\n", "anita_core.train.run_start")
    assert not violations("from anita_core.train.trainer import Trainer\n", "anita_core.recipes.sft")


def test_eval_and_chat_reach_the_shared_flags_without_the_trainer():
    """eval's and chat's commands import anita_core.cli for their flags and errors; the
    trainer, its command-line layer and the recipes stay out of them."""
    for path, module in ((ROOT / "chat.py", "chat"), (ROOT / "anita_core/eval/cli.py", "anita_core.eval.cli")):
        names = [name for _, name in imported_modules(path.read_text(encoding="utf-8"), module, False)]
        assert any(n.startswith("anita_core.cli.") for n in names), path
        wrong = [n for n in names if n.startswith(("anita_core.recipes", "anita_core.train.trainer",
                                                   "anita_core.train.cli"))]
        assert not wrong, f"{path.name} imports {wrong}"


# none: the memory flags become a memory.budget.MemoryRequest in the recipes' CLI
NAMESPACE_FREE_EXCEPTIONS: set = set()


def namespace_users(source: str) -> List[str]:
    """'line: what' for each parameter named ``args`` and each argparse.Namespace
    annotation or hasattr(args, ...) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                annotation = ast.unparse(a.annotation) if a.annotation is not None else ""
                if a.arg == "args" or "Namespace" in annotation:
                    found.append(f"{node.lineno}: {node.name}({a.arg})")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr") and node.args
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "args"):
            found.append(f"{node.lineno}: {node.func.id}(args, ...)")
    return found


def test_nothing_below_the_command_line_sees_an_argparse_namespace():
    """The recipes' cli_*.py turn the parsed flags into a typed config; the trainer,
    objectives, data builders, run folder, report and the recipes themselves take
    typed values."""
    problems = []
    # anita_core/cli is the argparse layer itself (its parser's parse_known_args(args) is argv)
    for package in ("anita_core/train", "anita_core/data", "anita_core/recipes", "anita_core/model",
                    "anita_core/lora", "anita_core/hf"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in NAMESPACE_FREE_EXCEPTIONS or path.name.startswith("cli_"):
                continue
            problems += [f"{rel}:{p}" for p in namespace_users(path.read_text(encoding="utf-8"))]
    assert not problems, "argparse values below the command line:\n" + "\n".join(problems)


def test_the_namespace_check_can_fail():
    assert namespace_users("def f(args, x):\n    pass\n") == ["1: f(args)"]
    assert namespace_users("def f(a: argparse.Namespace):\n    pass\n") == ["1: f(a)"]
    assert namespace_users("def f(c):\n    return hasattr(args, 'max_seq_length')\n") == [
        "2: hasattr(args, ...)"]
    assert namespace_users("def f(config):\n    return config.seed\n") == []
