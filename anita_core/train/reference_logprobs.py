"""DPO reference log-probs computed once per run instead of at every step.

The reference model (the base with adapters off, or a frozen adapter) never
changes during DPO, so its summed completion log-probs of each training pair
are fixed numbers. ``prepare_reference_logps`` computes them for the whole
training set (and the held-out pairs) in one no-grad pass before training (a
progress bar counts the batches), keeps them with the run, and DPOObjective
then looks them up by example index: each step, and each evaluation, runs only
the policy.

Layout under <output_dir>/reference_logps/:
    logps.safetensors   "logps" [N, 2]: (chosen, rejected) per training example, in the
                        dtype the reference pass returns; "computed" bool [N]
    key.json            what the numbers depend on (see ``reference_key``) and N
    manifest.json       size and hash of the two files (file_manifest.py): a damaged
                        store is named in a warning and recomputed

Rows are indexed by the *global example index* (the pair's position in the
training split, before any shuffle; held-out pairs follow the training ones),
which batches carry as ``example_index``:
a data-parallel run can compute any subset of the batches per rank and
``ReferenceLogps.merge`` the shards, and a lookup never depends on the order or
the sharding the steps see.

The values are computed from epoch 0's batches (the same pairs, padding and
shapes the first epoch's steps use) and the eval batches, so epoch 0 and every
evaluation read exactly the numbers the per-step reference pass would produce.
Later epochs batch the pairs differently; a per-step pass there could differ
from the stored value by rounding only (~1e-7 relative in fp32, measured: see
tests/test_dpo_reference.py).

A run that ends inside epoch 0 (--max-steps) computes only the batches it
reaches; a resume that goes further computes the rest and adds it to the store.

Staleness: the key holds fingerprints of the model, the reference, the
tokenized training and held-out pairs (which covers files, template,
truncation, split), the compute dtype and the batching. A store whose key differs is recomputed
when a run starts fresh (the log names the differing fields) and refused when
a run resumes, because the steps before the checkpoint were trained against
the recorded reference. Nothing here is pickled; the folder is assembled in a
temp folder and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anita_core.data.dpo import dpo_batches
from anita_core.data.dpo_pack import packed_dpo_batches
from anita_core.data.packing import shuffled
# the adapter writer's atomic folder swap, reused (private there, one implementation)
from anita_core.lora.peft import _fsync_path as fsync_path, _replace_dir as replace_dir
from anita_core.train.file_manifest import damage, write_manifest
from anita_core.train.storage_faults import disk_full_guard

FORMAT = 1
STORE_DIR = "reference_logps"
LOGPS_FILE = "logps.safetensors"
KEY_FILE = "key.json"
TEMP_PREFIX = f".{STORE_DIR}."
INDEX_KEY = "example_index"        # batch entry: LongTensor [pairs] of global example indices
BASE_REFERENCE = "base model, adapters off"


class StaleReferenceStore(ValueError):
    """A stored reference was computed for another model, reference, data, dtype or
    batching than this (resumed) run's."""


@dataclass
class ReferenceLogps:
    """Per-example reference log-probs: ``logps[i] = (chosen, rejected)`` of training
    example i; ``computed[i]`` says whether row i holds a value yet."""
    logps: torch.Tensor
    computed: torch.Tensor

    @classmethod
    def empty(cls, n_examples: int, dtype: torch.dtype = torch.float32) -> "ReferenceLogps":
        return cls(torch.zeros(n_examples, 2, dtype=dtype),
                   torch.zeros(n_examples, dtype=torch.bool))

    @property
    def n_examples(self) -> int:
        return self.logps.shape[0]

    @property
    def complete(self) -> bool:
        return bool(self.computed.all())

    def fill(self, indices: torch.Tensor, stacked: torch.Tensor) -> None:
        """Record a reference pass over a stacked batch: ``stacked`` [2 * pairs]
        holds the chosen sequences' values, then the rejected ones'."""
        indices = indices.to("cpu", torch.long)
        chosen, rejected = stacked.detach().to("cpu").chunk(2)
        if self.logps.dtype != stacked.dtype:
            if self.computed.any():
                raise ValueError(f"reference log-probs in {stacked.dtype}, the store holds "
                                 f"{self.logps.dtype}")
            self.logps = self.logps.to(stacked.dtype)
        self.logps[indices, 0], self.logps[indices, 1] = chosen, rejected
        self.computed[indices] = True

    def merge(self, other: "ReferenceLogps") -> None:
        """Take the rows ``other`` computed (e.g. another rank's shard)."""
        if other.n_examples != self.n_examples:
            raise ValueError(f"cannot merge reference log-probs of {other.n_examples} examples "
                             f"into a store of {self.n_examples}")
        rows = other.computed.nonzero().flatten()
        if len(rows):
            self.fill(rows, torch.cat([other.logps[rows, 0], other.logps[rows, 1]]))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[2 * pairs]: chosen values then rejected values, in the layout
        DPOObjective stacks a batch in."""
        indices = indices.to("cpu", torch.long)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.n_examples):
            raise IndexError(f"example index out of range for a store of {self.n_examples} examples")
        missing = indices[~self.computed[indices]]
        if len(missing):
            raise KeyError(f"no reference log-probs computed for example(s) {missing.tolist()[:5]}")
        rows = self.logps[indices]
        return torch.cat([rows[:, 0], rows[:, 1]])


def indexed_dpo_batches(pairs: Sequence, *, batch_size: int, pad_id: int,
                        shuffle_seed: Optional[int] = None, first_index: int = 0,
                        pad_to_multiple_of: Optional[int] = None,
                        pack_budget: Optional[int] = None) -> List[Dict]:
    """``dpo_batches`` (the same batches, in the same seeded order), each batch also
    carrying ``example_index``: its pairs' positions in ``pairs`` plus ``first_index``
    (the held-out split is numbered after the training split). ``pack_budget``: the
    same pairs per batch, packed into rows of that many tokens (data/dpo_pack.py)."""
    order = shuffled(range(len(pairs)), shuffle_seed)     # the permutation dpo_batches draws
    ordered = [pairs[i] for i in order]
    if pack_budget is not None:
        batches = packed_dpo_batches(ordered, batch_size=batch_size, budget=pack_budget,
                                     pad_id=pad_id)
    else:
        batches = dpo_batches(ordered, batch_size=batch_size, pad_id=pad_id,
                              pad_to_multiple_of=pad_to_multiple_of)
    for k, batch in enumerate(batches):
        rows = order[k * batch_size:(k + 1) * batch_size]
        batch[INDEX_KEY] = torch.tensor(rows, dtype=torch.long) + first_index
    return batches


def adapters_fingerprint(adapters) -> str:
    """sha256 over a frozen adapter's configuration, tensor names and values."""
    h = hashlib.sha256(repr(adapters.config).encode())
    for name, tensor in adapters.named_parameters():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_key(*, model: str, reference: str, data: str, dtype: torch.dtype,
                  batch_size: int, seed: int, n_examples: int,
                  pack_budget: Optional[int] = None) -> dict:
    """What the stored numbers depend on. ``model``, ``data``: run_identity's
    fingerprints; ``reference``: BASE_REFERENCE or ``adapters_fingerprint``;
    batch_size, seed and the packing fix epoch 0's batches (the shapes the values
    come from)."""
    batching = f"batch_size={batch_size} order_seed={seed}"
    if pack_budget is not None:
        batching += f" packed={pack_budget}"
    return {"format": FORMAT, "model": model, "reference": reference, "data": data,
            "dtype": str(dtype).replace("torch.", ""), "batching": batching, "examples": n_examples}


def key_differences(recorded: dict, current: dict) -> List[str]:
    return [f"{k}: stored {recorded.get(k, '(none)')!r}, this run {current.get(k, '(none)')!r}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]


def compute_reference_logps(objective, batches: Sequence[Dict], n_examples: int, *,
                            store: Optional[ReferenceLogps] = None,
                            progress: bool = True) -> ReferenceLogps:
    """One no-grad reference pass over ``batches`` (each with ``example_index``),
    into ``store`` (default: a new one); rows of examples in no batch stay
    uncomputed (e.g. a shard's store)."""
    from tqdm.auto import tqdm
    store = ReferenceLogps.empty(n_examples) if store is None else store
    with tqdm(total=len(batches), desc="reference log-probs", unit="batch", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for batch in batches:
            if INDEX_KEY not in batch:
                raise ValueError(f"a batch without {INDEX_KEY!r}: build it with indexed_dpo_batches")
            store.fill(batch[INDEX_KEY], objective.reference_logps(objective.stack_batch(batch)))
            bar.update(1)
    return store


def save_reference_logps(output_dir: Path, store: ReferenceLogps, key: dict) -> Path:
    """Write <output_dir>/reference_logps atomically (a reader sees the old store,
    the new one, or none; never a mix). A full disk raises DiskFull."""
    output_dir = Path(output_dir)
    final = output_dir / STORE_DIR
    tensors = {"logps": store.logps.contiguous(), "computed": store.computed.contiguous()}
    with disk_full_guard("the DPO reference store", final,
                         sum(t.numel() * t.element_size() for t in tensors.values())):
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=TEMP_PREFIX))
        try:
            save_file(tensors, str(tmp / LOGPS_FILE))
            (tmp / KEY_FILE).write_text(json.dumps(key, indent=1) + "\n")
            write_manifest(tmp)
            for path in (tmp / LOGPS_FILE, tmp / KEY_FILE, tmp):
                fsync_path(path)
            replace_dir(tmp, final)     # its ".reference_logps.old-*" matches TEMP_PREFIX
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def read_reference_logps(output_dir: Path):
    """(key, store) of a run's stored reference, or None when there is none;
    ValueError naming the file when it is unreadable or malformed."""
    folder = Path(output_dir) / STORE_DIR
    key_path, tensor_path = folder / KEY_FILE, folder / LOGPS_FILE
    if not key_path.is_file() or not tensor_path.is_file():
        return None
    problem = damage(folder)      # against its manifest (a store from before manifests: by structure)
    if problem:
        raise ValueError(f"{folder}: damaged: {problem}")
    try:
        key = json.loads(key_path.read_text())
        tensors = load_file(str(tensor_path))
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{folder}: cannot be read: {e}") from e
    logps, computed = tensors.get("logps"), tensors.get("computed")
    n = key.get("examples") if isinstance(key, dict) else None
    if (logps is None or computed is None or logps.shape != (n, 2) or computed.shape != (n,)
            or computed.dtype != torch.bool or not logps.is_floating_point()):
        raise ValueError(f"{tensor_path}: not a reference store of {n} examples "
                         f"(logps [N, 2] float, computed [N] bool)")
    return key, ReferenceLogps(logps, computed)


def remove_orphaned_stores(output_dir: Path) -> None:
    """Temp folders a killed save left (call only while holding the run's lock)."""
    for path in Path(output_dir).glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def prepare_reference_logps(objective, batches: Sequence[Dict], output_dir: Path, key: dict, *,
                            resume: bool, log: Callable[[str], None],
                            progress: bool = True, save: bool = True) -> ReferenceLogps:
    """The run's reference log-probs for ``batches`` (the ones the run reads: epoch
    0's, up to the run's last step if it ends earlier, and the eval batches). Rows
    stored under the same ``key`` are loaded; only batches holding a row not stored
    yet run the reference (all of them for a new run, none for a resume of the
    same length), and the store is saved when that added rows. A store with
    another key raises StaleReferenceStore on ``resume``; a fresh run recomputes it.
    ``save`` off (every rank but rank 0 of a distributed run): nothing is written or
    cleaned up in ``output_dir``."""
    if save:
        remove_orphaned_stores(output_dir)
    folder = Path(output_dir) / STORE_DIR
    store = None
    try:
        found = read_reference_logps(output_dir)
    except ValueError as e:
        log(f"warning: {e}; recomputing the reference log-probs")
        found = None
    if found is not None:
        stored_key, stored = found
        differences = key_differences(stored_key, key)
        if not differences:
            store = stored
        elif resume:
            raise StaleReferenceStore(
                f"{folder} holds reference log-probs computed for other settings than this run's:\n  "
                + "\n  ".join(differences)
                + "\nResume with the original model, reference adapter, data and --dtype, or "
                  "start a new run (--overwrite, or another --output-dir)")
        else:
            log(f"stored reference log-probs in {folder} are stale ({'; '.join(differences)}): "
                f"recomputing")
    loaded = int(store.computed.sum()) if store is not None else 0
    todo = [b for b in batches if store is None or not bool(store.computed[b[INDEX_KEY]].all())]
    if not todo:
        log(f"reference log-probs of {loaded} pairs loaded from {folder}")
        return store
    store = compute_reference_logps(objective, todo, key["examples"], store=store, progress=progress)
    if save:
        save_reference_logps(output_dir, store, key)
    added = int(store.computed.sum()) - loaded
    log(f"reference log-probs of {added} pairs computed once"
        + (f" ({loaded} loaded)" if loaded else "") + f", kept in {folder}")
    return store
