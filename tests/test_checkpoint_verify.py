"""Checkpoints that verify themselves: each records the size and xxh3-128 of every
file in a manifest written last; --resume checks it before loading, names a
damaged newest checkpoint in a warning and resumes from the newest intact one,
or says in one line that none is intact, listing them. A checkpoint from before
manifests is checked by structure (JSON parses, safetensors headers cover their
files) and still resumes. --init-adapter gets the same check (a PEFT-written
adapter, which has no manifest, by structure), before the base model loads."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model.config import ModelConfig
from anita_core.train.file_manifest import HASH, MANIFEST_FILE, damage, file_hash
from anita_core.train.run_checkpoint import (LATEST, WRITTEN_WITH_MANIFEST, checkpoint_candidates,
                                             checkpoint_damage, latest_checkpoint,
                                             newest_intact_checkpoint, position_problem,
                                             save_checkpoint)
from tests.run_cli import TINY, metric_steps, run_script

TWO_LAYERS = ModelConfig(vocab_size=37, hidden_size=24, intermediate_size=38, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "trainer_state.json",
         "trainer_state.safetensors"]


def write_checkpoints(out: Path, steps, seed: int):
    adapters = LoRAAdapters.init(LoRAConfig(r=2, alpha=4, seed=seed), TWO_LAYERS)
    for step in steps:
        state = {"step": step, "moments": torch.randn(64, 5, generator=torch.Generator().manual_seed(step))}
        save_checkpoint(out, step, adapters, state, keep=0)
    return out / "checkpoints"


def cut_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_a_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_manifest_records_every_file_and_names_what_is_damaged(tmp_path, fresh_seed):
    root = write_checkpoints(tmp_path, [1], fresh_seed)
    checkpoint = root / "step-00000001"
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert manifest["hash"] == HASH and sorted(manifest["files"]) == FILES
    for name, entry in manifest["files"].items():
        assert entry == {"size": (checkpoint / name).stat().st_size, HASH: file_hash(checkpoint / name)}
    assert damage(checkpoint) is None

    damaged = tmp_path / "damaged"
    cases = {
        "trainer_state.safetensors": (cut_to_half, r"^trainer_state\.safetensors: cut short, "
                                                   r"[\d,]+ bytes of the [\d,]+ written$"),
        "adapter/adapter_model.safetensors": (flip_a_byte, r"^adapter/adapter_model\.safetensors: bytes "
                                                           r"changed since it was written"),
        "trainer_state.json": (Path.unlink, r"^trainer_state\.json: missing$"),
        MANIFEST_FILE: (lambda p: p.write_text('{"files": '), r"^manifest\.json: unreadable"),
    }
    for name, (harm, expected) in cases.items():
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(checkpoint, damaged)
        harm(damaged / name)
        assert re.search(expected, damage(damaged) or ""), (name, damage(damaged))
    # the adapter folder inside a checkpoint is checked against the checkpoint's manifest
    shutil.rmtree(damaged)
    shutil.copytree(checkpoint, damaged)
    assert damage(damaged / "adapter") is None
    flip_a_byte(damaged / "adapter" / "adapter_model.safetensors")
    assert damage(damaged / "adapter").startswith("adapter_model.safetensors: bytes changed")


def test_a_checkpoint_without_a_manifest_is_checked_by_structure(tmp_path, fresh_seed):
    """What a checkpoint from before manifests (or a PEFT-written adapter) gets."""
    root = write_checkpoints(tmp_path, [1], fresh_seed)
    legacy = root / "step-00000001"
    (legacy / MANIFEST_FILE).unlink()
    assert damage(legacy) is None
    tensors = legacy / "trainer_state.safetensors"
    size = tensors.stat().st_size
    cut_to_half(tensors)
    assert damage(legacy) == (f"trainer_state.safetensors: cut short, {size // 2:,} bytes of the "
                              f"{size:,} its header describes")
    tensors.write_bytes(b"\x05")
    assert damage(legacy) == "trainer_state.safetensors: cut short, 1 bytes: too few for a safetensors header"
    tensors.unlink()
    (legacy / "adapter" / "adapter_config.json").write_text('{"r": ')
    assert damage(legacy).startswith("adapter/adapter_config.json: not valid JSON")


def test_resume_takes_the_newest_intact_checkpoint_that_latest_leads_to(tmp_path, fresh_seed):
    root = write_checkpoints(tmp_path, [1, 2, 3, 4], fresh_seed)
    assert latest_checkpoint(tmp_path) == root / "step-00000004"
    cut_to_half(root / "step-00000004" / "trainer_state.safetensors")
    flip_a_byte(root / "step-00000003" / "adapter" / "adapter_model.safetensors")
    chosen, damaged = newest_intact_checkpoint(tmp_path)
    assert chosen == root / "step-00000002"
    assert [(p.name, problem.split(":")[0]) for p, problem in damaged] == [
        ("step-00000004", "trainer_state.safetensors"), ("step-00000003", "adapter/adapter_model.safetensors")]
    assert (root / "step-00000004").is_dir(), "a damaged checkpoint is left as it is"
    # `latest` naming step 2 (a resume from it began a new timeline): steps 3 and 4
    # are not this run's, intact or not
    (root / LATEST).write_text("step-00000002")
    assert checkpoint_candidates(tmp_path) == [root / "step-00000002", root / "step-00000001"]
    (root / LATEST).write_text("step-00000009")          # naming nothing: newest first
    assert checkpoint_candidates(tmp_path)[0] == root / "step-00000004"


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory) -> Path:
    """A 3-step run checkpointed at every step (the torch kernel backend: this is
    about files, not kernels)."""
    out = tmp_path_factory.mktemp("verify") / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", 3, "--save-steps", 1,
                      "--save-total-limit", 0, "--output-dir", out, ANITA_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def as_written_before_manifests(checkpoint: Path) -> None:
    """A checkpoint as an anita from before manifests wrote it: no manifest, and no
    mark in its trainer state that it had one."""
    (checkpoint / MANIFEST_FILE).unlink()
    edit_state(checkpoint, lambda fields: fields.pop(WRITTEN_WITH_MANIFEST))


def edit_state(checkpoint: Path, edit) -> None:
    path = checkpoint / "trainer_state.json"
    data = json.loads(path.read_text())
    edit(data["__dict__"])
    path.write_text(json.dumps(data))


def resume(out: Path, steps: int):
    return run_script("train_sft.py", *TINY, "--max-steps", steps, "--save-steps", 1, "--save-total-limit", 0,
                      "--output-dir", out, "--resume", ANITA_BACKEND="torch")


def test_resume_passes_over_a_cut_short_checkpoint_and_an_old_one_still_resumes(damaged_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(damaged_run, out)
    root = out / "checkpoints"
    for name in ("adapter/adapter_model.safetensors", "trainer_state.safetensors"):   # the case
        cut_to_half(root / "step-00000003" / name)
    proc = resume(out, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf"warning: checkpoint {re.escape(str(root / 'step-00000003'))} is damaged: "
                        r"adapter/adapter_model\.safetensors: cut short, [\d,]+ bytes of the [\d,]+ "
                        r"written; resuming from the newest intact one, step-00000002; the damaged "
                        rf"one is moved to {re.escape(str(root / 'damaged-step-00000003'))} \(kept for "
                        r"you to inspect or delete: nothing resumes from it, prunes it or writes over "
                        r"it\)", warnings[0]), warnings[0]
    assert f"resumed from {root / 'step-00000002'} at step 2" in proc.stderr
    assert metric_steps(out) == [1, 2, 3, 4]
    assert damage(root / "step-00000003") is None, "step 3 was written again, complete"
    assert damage(root / "damaged-step-00000003").startswith("adapter/adapter_model.safetensors: cut short")

    # a run of an anita from before manifests: checked by structure, and still resumes
    old = tmp_path / "old"
    shutil.copytree(damaged_run, old)
    for step in (1, 2, 3):
        as_written_before_manifests(old / "checkpoints" / f"step-{step:08d}")
    cut_to_half(old / "checkpoints" / "step-00000003" / "trainer_state.safetensors")
    proc = resume(old, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is damaged: trainer_state.safetensors: cut short" in proc.stderr
    assert metric_steps(old) == [1, 2, 3, 4]


def test_a_checkpoint_without_its_manifest_or_with_another_step_is_damaged(damaged_run, tmp_path):
    """The issue's case: the manifest deleted and the state's step edited from 3 to 2.
    Resuming it would run steps 3.. again on step 3's weights and AdamW state."""
    out = tmp_path / "run"
    shutil.copytree(damaged_run, out)
    root = out / "checkpoints"
    (root / "step-00000003" / MANIFEST_FILE).unlink()
    assert checkpoint_damage(root / "step-00000003") == (
        "manifest.json: missing, though this run writes one into every checkpoint (without it no "
        "file can be verified)")
    edit_state(root / "step-00000003", lambda fields: fields.update(step=2))
    proc = resume(out, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: checkpoint {root / 'step-00000003'} is damaged: manifest.json: missing" in proc.stderr
    assert f"resumed from {root / 'step-00000002'} at step 2" in proc.stderr
    assert metric_steps(out) == [1, 2, 3, 4]

    # without any manifest (an old run), the step against the folder's name
    old = root / "step-00000003"
    as_written_before_manifests(old)
    edit_state(old, lambda fields: fields.update(step=2))
    for step in (1, 2):
        as_written_before_manifests(root / f"step-{step:08d}")
    assert checkpoint_damage(old) == "trainer_state.json: holds step 2, but the folder is step-00000003"
    edit_state(old, lambda fields: fields.update(step=3))
    assert checkpoint_damage(old) is None


def test_a_data_position_that_is_not_the_steps_is_refused(damaged_run, tmp_path):
    """A state whose step agrees with its folder but whose data position (or optimizer
    step count) does not, manifest and all (a writer's bug, or an edit with its
    manifest written again): refused when the trainer resumes, naming both."""
    from anita_core.train.file_manifest import write_manifest
    out = tmp_path / "run"
    shutil.copytree(damaged_run, out)
    checkpoint = out / "checkpoints" / "step-00000003"
    fields = json.loads((checkpoint / "trainer_state.json").read_text())["__dict__"]
    edit_state(checkpoint, lambda f: f.update(batch_index=f["batch_index"] + 1))
    write_manifest(checkpoint)
    proc = resume(out, 4)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"error: --resume: {checkpoint}: trainer_state.json: its data position (epoch 0, micro-batch "
        f"{fields['batch_index'] + 1}) is not where step 3 ends (epoch 0, micro-batch "
        f"{fields['batch_index']}); resume from another checkpoint") in proc.stderr.splitlines()
    assert metric_steps(out) == [1, 2, 3]


def stops_before_loading(main, argv, capsys) -> str:
    """Run a script's main in this process (it stops before anything loads, so no
    subprocess is needed); return its stderr, having checked the exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_with_no_intact_checkpoint_one_line_lists_them_before_anything_loads(damaged_run, tmp_path,
                                                                              capsys):
    import train_sft
    out = tmp_path / "run"
    shutil.copytree(damaged_run, out)
    root = out / "checkpoints"
    for step in (1, 2, 3):
        flip_a_byte(root / f"step-{step:08d}" / "trainer_state.safetensors")
    err = stops_before_loading(train_sft.main, [*TINY, "--max-steps", 4, "--output-dir", out, "--resume"],
                               capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume: no intact checkpoint under {root} ("), lines
    for step in (3, 2, 1):
        assert f"step-{step:08d}: trainer_state.safetensors: bytes changed since it was written" in lines[0]
    assert lines[0].endswith("restore one from a copy, or start again without --resume (with --overwrite)")

    # --resume DIR naming a damaged checkpoint: refused, naming it, nothing else tried
    err = stops_before_loading(train_sft.main, [*TINY, "--output-dir", out, "--resume", root / "step-00000002"],
                               capsys)
    assert err.startswith(f"error: --resume: {root / 'step-00000002'}: damaged: trainer_state.safetensors: "
                          f"bytes changed since it was written"), err


def test_init_adapter_is_verified_before_the_model_loads(damaged_run, tmp_path, capsys):
    import train_dpo
    import train_sft
    adapter = tmp_path / "adapter"
    shutil.copytree(damaged_run / "adapter", adapter)
    assert (adapter / MANIFEST_FILE).is_file(), "the run's final adapter carries a manifest"
    flip_a_byte(adapter / "adapter_model.safetensors")
    err = stops_before_loading(train_dpo.main, ["--no-progress", "--init-adapter", adapter, "--output-dir",
                                                tmp_path / "dpo"], capsys)
    assert err.strip() == (f"error: --init-adapter {adapter}: damaged: adapter_model.safetensors: "
                           f"bytes changed since it was written (its xxh3_128 hash differs)")

    # as PEFT writes an adapter (no manifest), cut short: the structure check finds it
    (adapter / MANIFEST_FILE).unlink()
    shutil.copy(damaged_run / "adapter" / "adapter_model.safetensors", adapter)
    size = (adapter / "adapter_model.safetensors").stat().st_size
    cut_to_half(adapter / "adapter_model.safetensors")
    err = stops_before_loading(train_sft.main, ["--no-progress", "--init-adapter", adapter, "--output-dir",
                                                tmp_path / "sft"], capsys)
    assert err.strip() == (f"error: --init-adapter {adapter}: damaged: adapter_model.safetensors: "
                           f"cut short, {size // 2:,} bytes of the {size:,} its header describes")
    err = stops_before_loading(train_dpo.main, ["--no-progress", "--reference-adapter", tmp_path / "nowhere",
                                                "--output-dir", tmp_path / "dpo2"], capsys)
    assert err.strip() == f"error: --reference-adapter {tmp_path / 'nowhere'}: no such adapter folder"


def test_the_position_check_knows_how_the_trainer_moves():
    """Each step takes `span` micro-batches; an epoch ends at its last micro-batch that
    splits over the writer's ranks, and the next starts at 0."""
    import torch
    ok = {"step": 5, "epoch": 1, "batch_index": 4}         # 6 micro-batches: 3 steps of 2 an epoch
    assert position_problem(ok, micro_batches=6, span=2, world=1) is None
    assert position_problem(dict(ok, step=6, epoch=2, batch_index=0), 6, 2, 1) is None
    assert position_problem(dict(ok, batch_index=2), 6, 2, 1) == (
        "trainer_state.json: its data position (epoch 1, micro-batch 2) is not where step 5 ends "
        "(epoch 1, micro-batch 4)")
    assert position_problem(dict(ok, step="5"), 6, 2, 1) == \
        "trainer_state.json: step must be a count of steps, got '5'"
    # 7 micro-batches: 4 steps an epoch on one rank, 3 on two (the 7th is left out), the
    # writer's ranks read from its accumulation (span 2 = 1 x 2 ranks)
    assert position_problem(dict(ok, step=4, epoch=1, batch_index=0), 7, 2, 1) is None
    two_ranks = dict(ok, step=4, epoch=1, batch_index=2)
    assert position_problem(two_ranks, 7, 2, 1) is not None
    assert position_problem(dict(two_ranks, config={"gradient_accumulation_steps": 1}), 7, 2, 1) is None
    adam = {"state": {0: {"step": torch.tensor(5.0)}, 1: {"step": torch.tensor(5.0)}}}
    assert position_problem(dict(ok, optimizer=adam), 6, 2, 1) is None
    adam["state"][1]["step"] = torch.tensor(4.0)                   # a parameter without a grad once
    assert position_problem(dict(ok, optimizer=adam), 6, 2, 1) is None
    adam["state"][0]["step"] = torch.tensor(7.0)
    assert position_problem(dict(ok, optimizer=adam), 6, 2, 1) == (
        "trainer_state.json: the optimizer has taken 7 steps, but the state is of step 5")
