"""Atomic training checkpoints: adapter (PEFT format) + optimizer, schedule, RNG
and data position, so a run resumes exactly where it stopped.

Layout under <output_dir>/checkpoints/:
    step-00000042/adapter/...                  PEFT adapter_config.json + adapter_model.safetensors
    step-00000042/trainer_state.json           positions, settings, optimizer hyper-parameters
    step-00000042/trainer_state.safetensors    every tensor of the state (optimizer moments,
                                               RNG states as uint8 / int64 tensors)
    step-00000042/manifest.json                size and hash of each file above, written last
                                               (file_manifest.py)
    latest                                     text file naming the newest complete checkpoint

No pickle is ever read: a checkpoint folder handed over by someone else can hold
only numbers and text. A trainer_state.pt (pickle) written by an older anita is
refused, not loaded.

A checkpoint is assembled in a hidden temp directory and renamed into place,
and ``latest`` is replaced atomically afterwards, so a process killed at any
moment leaves the previous checkpoint intact and pointed to. Temp folders a
killed process left behind are removed by ``remove_orphaned_temp_files``; a
write that meets a full disk removes its own and raises
storage_faults.DiskFull.

``newest_intact_checkpoint`` is what a resume uses: the newest complete
checkpoint that ``checkpoint_damage`` finds nothing wrong with:
- its files match its manifest (file_manifest.py). Every checkpoint this version
  writes has one, and its trainer_state.json says so (``manifest_format``): such a
  checkpoint without its manifest is damaged, and so is one without a manifest in a
  checkpoints/ folder whose other checkpoints have theirs (deleting the manifest must
  not turn the hash check off). Only a checkpoint of an anita from before manifests,
  none of whose siblings has one either, is checked by structure alone;
- its trainer state's step is the one in its folder's name (step-00000004 holds
  step 4). The data position and the optimizer's step count are checked against
  the step when the trainer resumes (``position_problem``: that needs the data).
The damaged ones a resume passes over are moved aside, to checkpoints/damaged-<name>,
where nothing resumes from, prunes or overwrites them (a later save of the same step
would otherwise replace them).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anita_core.lora import save_peft
from anita_core.train import stop_points
from anita_core.train.file_manifest import FORMAT as MANIFEST_FORMAT
from anita_core.train.file_manifest import MANIFEST_FILE, damage, write_manifest
from anita_core.train.storage_faults import EXIT_DISK_FULL, DiskFull, disk_full_guard, disk_full_message

LATEST = "latest"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FILE = STATE_JSON          # the file whose presence marks a complete checkpoint
LEGACY_STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
TEMP_PREFIX = ".step-"
DAMAGED_PREFIX = "damaged-"
WRITTEN_WITH_MANIFEST = "manifest_format"   # trainer_state.json: this checkpoint has a manifest


def rng_snapshot(dropout_generator: Optional[torch.Generator]) -> dict:
    snap = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    if dropout_generator is not None:
        snap["dropout"] = dropout_generator.get_state()
    return snap


def rng_restore(snap: dict, dropout_generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(snap["torch"])
    python = snap["python"]         # (version, tuple of ints, gauss_next); JSON gives lists
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(tuple(snap["numpy"]))
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])
    if dropout_generator is not None and "dropout" in snap:
        dropout_generator.set_state(snap["dropout"])


# ------------------------------------------------------------ state <-> JSON + tensors
def _split(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data; every tensor (and numpy array) moved into
    ``tensors`` under a fresh key and replaced by a reference to it."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        # int64 holds every uint32 word of numpy's MT19937 state exactly
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value)
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _split(v, tensors) for k, v in value.items()}}
        return {"__items__": [[k, _split(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_split(v, tensors) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state holds a {type(value).__name__}, which is neither a tensor "
                    f"nor plain data")


def _join(value: Any, tensors: Dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(value, list):
        return [_join(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__ndarray__" in value:
        key = value.get("__tensor__", value.get("__ndarray__"))
        if key not in tensors:
            raise ValueError(f"{where}: refers to tensor {key!r}, which {STATE_TENSORS} lacks")
        if "__ndarray__" in value:
            return tensors[key].numpy().astype(np.dtype(value["dtype"]))
        return tensors[key]
    if "__dict__" in value:
        return {k: _join(v, tensors, where) for k, v in value["__dict__"].items()}
    if "__items__" in value:
        return {k: _join(v, tensors, where) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(_join(v, tensors, where) for v in value["__tuple__"])
    raise ValueError(f"{where}: unexpected object {sorted(value)} in the trainer state")


def split_state(state: dict) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(JSON-able data, tensors) of a trainer state, as write_state stores them."""
    tensors: Dict[str, torch.Tensor] = {}
    return _split(state, tensors), tensors


def write_state(folder: Path, state: dict) -> None:
    """``state`` as trainer_state.json + trainer_state.safetensors, fsynced."""
    data, tensors = split_state(state)
    save_file(tensors, str(folder / STATE_TENSORS))
    with open(folder / STATE_JSON, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(folder / STATE_TENSORS, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_checkpoint_files(checkpoint: Path) -> None:
    """Raise (ValueError / FileNotFoundError, naming the file) unless ``checkpoint``
    holds a trainer state this version reads; cheap, reads no content."""
    checkpoint = Path(checkpoint)
    json_path, tensor_path = checkpoint / STATE_JSON, checkpoint / STATE_TENSORS
    if not json_path.is_file():
        if (checkpoint / LEGACY_STATE_FILE).exists():
            raise ValueError(
                f"{checkpoint / LEGACY_STATE_FILE}: a pickled trainer state from an older anita; "
                f"it is not loaded, because unpickling a file can run any code. Start a new run "
                f"(its adapter folder can be given to --init-adapter), or resume from a "
                f"checkpoint that holds {STATE_JSON} + {STATE_TENSORS}")
        raise FileNotFoundError(f"{json_path}: no trainer state (not a complete anita checkpoint)")
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path}: missing (incomplete checkpoint)")


def load_checkpoint_state(checkpoint: Path) -> dict:
    """The trainer state of a checkpoint; never unpickles anything."""
    checkpoint = Path(checkpoint)
    json_path, tensor_path = checkpoint / STATE_JSON, checkpoint / STATE_TENSORS
    check_checkpoint_files(checkpoint)
    try:
        data = json.loads(json_path.read_text())
        tensors = load_file(str(tensor_path))
    except (ValueError, OSError, RuntimeError) as e:
        raise ValueError(f"{checkpoint}: trainer state cannot be read: {e}") from e
    try:
        state = _join(data, tensors, json_path)
    except (RecursionError, TypeError, KeyError, AttributeError) as e:    # a hand-made or mangled file
        raise ValueError(f"{json_path}: not an anita trainer state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{json_path}: not an anita trainer state (no 'step')")
    return state
def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(output_dir: Path, step: int, adapters, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``.
    A full disk raises DiskFull (the partial folder removed, the others untouched)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    with disk_full_guard("checkpoint", final, checkpoint_bytes(adapters, state)):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TEMP_PREFIX}{step:08d}."))
        try:
            save_peft(adapters, tmp / ADAPTER_DIR)
            write_state(tmp, {**state, WRITTEN_WITH_MANIFEST: MANIFEST_FORMAT})
            write_manifest(tmp)
            stop_points.reached(f"checkpoint:{step}")
            if final.exists():          # a re-save of the same step (e.g. after resume)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_text_atomically(root / LATEST, final.name)
    if keep > 0:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def checkpoint_bytes(adapters, state: dict) -> int:
    """About the bytes a checkpoint of ``adapters`` and ``state`` takes: its tensors
    (counted where they are, nothing copied; the adapter is written as fp32)."""
    return _tensor_bytes(state) + sum(4 * p.numel() for p in adapters.parameters())


def _holds_state(folder: Path) -> bool:
    # a legacy pickle counts, so that resuming from it is refused with its reason
    return (folder / STATE_FILE).is_file() or (folder / LEGACY_STATE_FILE).is_file()


def checkpoint_candidates(output_dir: Path) -> List[Path]:
    """The run's complete checkpoints, the one to resume first: the one ``latest``
    names, then the older ones, newest first. Newer ones than ``latest`` names
    belong to a timeline a --resume of an older checkpoint abandoned (or to a
    save whose pointer update failed): never resumed while ``latest`` is valid."""
    root = Path(output_dir) / "checkpoints"
    complete = sorted((p for p in root.glob("step-*") if _holds_state(p)), reverse=True)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is None or named not in complete:
        return complete
    return [named] + [p for p in complete if p.name < named.name]


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None (its files are not read)."""
    candidates = checkpoint_candidates(output_dir)
    return candidates[0] if candidates else None


def _recorded(checkpoint: Path) -> dict:
    """The plain top-level values of a checkpoint's trainer_state.json ({} if unreadable:
    the file checks say why)."""
    try:
        data = json.loads((checkpoint / STATE_JSON).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    fields = data.get("__dict__") if isinstance(data, dict) else None
    return fields if isinstance(fields, dict) else {}


def checkpoint_damage(checkpoint: Path) -> Optional[str]:
    """None if ``checkpoint`` is intact, else what is wrong, naming the file (the
    rules: module docstring)."""
    checkpoint = Path(checkpoint)
    recorded = _recorded(checkpoint)
    if not (checkpoint / MANIFEST_FILE).is_file():
        # an older checkpoint of the run with a manifest: this run writes them (a run of an
        # anita from before manifests, resumed by this one, has older ones without)
        older = [p for p in checkpoint.parent.glob("step-*") if p.name < checkpoint.name]
        if recorded.get(WRITTEN_WITH_MANIFEST) is not None or any(
                (p / MANIFEST_FILE).is_file() for p in older):
            return (f"{MANIFEST_FILE}: missing, though this run writes one into every checkpoint "
                    "(without it no file can be verified)")
    problem = damage(checkpoint)
    if problem:
        return problem
    named = re.fullmatch(r"step-(\d+)", checkpoint.name)
    step = recorded.get("step")
    # (no trainer_state.json at all, e.g. a legacy pickle: check_checkpoint_files says why)
    if named and (checkpoint / STATE_JSON).is_file() and (isinstance(step, bool)
                                                          or step != int(named.group(1))):
        return f"{STATE_JSON}: holds step {step!r}, but the folder is {checkpoint.name}"
    return None


def settings_differences(recorded: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """One line per setting whose value differs (absent counts as a value)."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "(not recorded)"), current.get(key, "(not set)")
        if old != new:
            lines.append(f"  {key}: checkpoint {old!r}, this run {new!r}")
    return lines


def position_problem(state: dict, micro_batches: int, span: int, world: int) -> Optional[str]:
    """What disagrees with the state's step, or None: its data position, where the
    trainer stands after that many steps (each takes the next ``span`` of an epoch's
    ``micro_batches``, the last few that do not split over the writer's ranks left
    out), and the optimizer's own step count. The writer's world size is its global
    micro-batches per step over its accumulation (a resume may change the ranks, not
    the global batch), else ``world``."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"{STATE_JSON}: step must be a count of steps, got {step!r}"
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    accum = config.get("gradient_accumulation_steps")
    if isinstance(accum, int) and accum > 0 and span % accum == 0:
        world = span // accum
    usable = micro_batches - micro_batches % world
    steps_per_epoch = max(1, -(-usable // span))
    epoch, done = divmod(step, steps_per_epoch)
    found = (state.get("epoch"), state.get("batch_index"))
    if found != (epoch, done * span):
        return (f"{STATE_JSON}: its data position (epoch {found[0]!r}, micro-batch {found[1]!r}) is "
                f"not where step {step} ends (epoch {epoch}, micro-batch {done * span})")
    optimizer = state.get("optimizer")
    counts = [entry["step"] for entry in (optimizer.get("state") or {}).values()
              if isinstance(entry, dict) and "step" in entry] if isinstance(optimizer, dict) else []
    taken = max((float(c) for c in counts), default=None)
    if taken is not None and taken != step:
        return f"{STATE_JSON}: the optimizer has taken {taken:g} steps, but the state is of step {step}"
    return None


def newest_intact_checkpoint(output_dir: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """(the newest complete checkpoint whose files verify, or None; the newer
    ones passed over as (path, what is wrong))."""
    damaged = []
    for candidate in checkpoint_candidates(output_dir):
        problem = checkpoint_damage(candidate)
        if problem is None:
            return candidate, damaged
        damaged.append((candidate, problem))
    return None, damaged


def set_aside(checkpoint: Path) -> Path:
    """Move a damaged checkpoint to <its folder>/damaged-<name> (a free name), out of
    reach of resumes, pruning and saves; returns where it went."""
    target = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}.{n}")
    os.rename(checkpoint, target)
    return target


def choose_resume_checkpoint(output_dir: Path, explicit: Optional[Path], log) -> Path:
    """The checkpoint a --resume continues from, verified: ``explicit`` (--resume
    DIR), or the run's newest intact one, each damaged newer one named in a
    warning and set aside. ValueError (or FileNotFoundError), in one line, when there
    is none."""
    if explicit is not None:
        check_checkpoint_files(explicit)
        problem = checkpoint_damage(explicit)
        if problem:
            raise ValueError(f"{explicit}: damaged: {problem}; resume from another checkpoint "
                             f"(--resume with no folder takes the run's newest intact one)")
        return explicit
    root = Path(output_dir) / "checkpoints"
    chosen, damaged = newest_intact_checkpoint(output_dir)
    if chosen is None and damaged:
        listed = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
        raise ValueError(f"no intact checkpoint under {root} ({listed}); restore one from a copy, "
                         f"or start again without --resume (with --overwrite)")
    if chosen is None:
        raise ValueError(f"no checkpoint under {root}; start without --resume (with --overwrite "
                         f"if the folder holds an earlier run's files)")
    check_checkpoint_files(chosen)
    for path, problem in damaged:
        kept = set_aside(path)
        log(f"warning: checkpoint {path} is damaged: {problem}; resuming from the newest intact "
            f"one, {chosen.name}; the damaged one is moved to {kept} (kept for you to inspect or "
            f"delete: nothing resumes from it, prunes it or writes over it)")
    return chosen


def remove_orphaned_temp_files(output_dir: Path) -> List[Path]:
    """Remove the half-written checkpoint folders and temp files that a killed
    process left in ``output_dir`` (call it only while holding the run's lock).
    Returns what was removed."""
    removed = []
    root = Path(output_dir) / "checkpoints"
    candidates = list(root.glob(f"{TEMP_PREFIX}*")) + list(root.glob(f".{LATEST}.*"))
    candidates += list(Path(output_dir).glob(".metrics.jsonl.*"))
    for path in candidates:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def exit_on_disk_full(output_dir, log) -> Iterator[None]:
    """Inside: a DiskFull ends the script, its line logged (naming the run's last
    complete checkpoint) and SystemExit(EXIT_DISK_FULL) raised."""
    try:
        yield
    except DiskFull as e:
        log(disk_full_message(e, latest_checkpoint(output_dir)))
        raise SystemExit(EXIT_DISK_FULL) from None
