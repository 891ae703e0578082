"""One record per op family: what the rest of the project builds from a kernel file.

Each op family's module ends with ``RECORD = OpRecord(...)``. The record holds the
family's launchers (the Triton functions; csrc_torch's mirror module defines the
same names) and names, by dotted path, what lives outside the product: the float64
reference, the backend parity check, the benchmark and the sm_90 compile specs.
Dotted paths, not imports: the product never imports tests/ or bench/.

Built from the records (``all_records()``):
  tests/test_torch_backend.py   every mirror has every launcher, same signature, and
                                each record's parity check runs on both backends
  tests/sm90_compile.py         the compile specs of every family
  bench/kernels.py              the op benchmarks
anita_core/model/ops.py imports the launchers it dispatches by name (a reader follows
a call from the model into a kernel by its imports); a test holds it to the records.

A new op family therefore touches its kernel file (with its record), its csrc_torch
mirror and its test (which may hold its reference, parity check and compile specs).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple


@dataclass(frozen=True)
class OpRecord:
    name: str                           # the op family
    launchers: Tuple[Callable, ...]     # csrc_triton's launchers; the mirror has the same names
    torch_mirror: Optional[str] = None  # csrc_torch module with the same launchers (None: Triton only)
    reference: Optional[str] = None     # module of the float64 reference
    parity: Optional[str] = None        # 'module:function(dtype)': mirror vs kernel vs reference
    bench: Optional[str] = None         # 'module:function(settings) -> [OpSpec]'
    compile_specs: Optional[str] = None  # 'module:function() -> [KernelSpec]' (sm_90, no GPU)

    @property
    def launcher_names(self) -> Tuple[str, ...]:
        return tuple(f.__name__ for f in self.launchers)


def resolve(path: str):
    """'package.module:attribute' -> the attribute; 'package.module' -> the module."""
    module_name, _, attribute = path.partition(":")
    module = importlib.import_module(module_name)
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"OpRecord path {path!r}: {module_name} has no {attribute!r}") from None


def all_records() -> List[OpRecord]:
    """The RECORD of every csrc_triton module that has one, by family name; a family
    declared twice is refused."""
    records = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        module = importlib.import_module(f"{__package__}.{info.name}")
        record = getattr(module, "RECORD", None)
        if isinstance(record, OpRecord):
            if record.name in records:
                raise ValueError(f"op family {record.name!r} has two records")
            records[record.name] = record
    return [records[name] for name in sorted(records)]
