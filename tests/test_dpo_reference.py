"""DPO reference log-probs computed once (--precompute-reference): the same
losses and gradients as the per-step reference pass, bit for bit; a resumed run
loads them and runs no reference forward; a store made for other data, another
template, model, reference or dtype is detected (refused on resume, recomputed
on a fresh start); the store's files are plain safetensors + JSON.

Why bitwise: in fp32 the precompute runs the very reference forward the
per-step path runs (same kernels, same batch shapes: it walks epoch 0's
batches), the policy forward and backward are untouched, and the reference
pass draws no dropout randomness, so the same bits must come out. (The same
examples batched differently can differ by ~1e-7 relative: measured 1.2e-7
on the torch backend, 9.5e-8 on the Triton interpreter; hence epoch 0.)

The model is the bundled tiny base on the torch backend: the kernels are not
what is under test here, and the Triton interpreter would cost minutes. One
torch thread: on a shared 2-core machine, torch's thread pool on matrices this
small spends ~50x the compute spinning (measured: a DPO micro-step 3 s of CPU
with 2 threads under load, 0.06 s with 1).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from anita_core.assets import sample_path
from anita_core.data import DPODataConfig, build_dpo_data, load_tokenizer
from anita_core.hf import load_model
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model import ops
from anita_core.cli.common import BUNDLED_MODEL
from anita_core.train.objectives import DPOObjective
from anita_core.train.reference_logprobs import (BASE_REFERENCE, INDEX_KEY, KEY_FILE, LOGPS_FILE,
                                                 STORE_DIR, ReferenceLogps, StaleReferenceStore,
                                                 adapters_fingerprint, compute_reference_logps,
                                                 indexed_dpo_batches, prepare_reference_logps,
                                                 reference_key)
from anita_core.train.file_manifest import MANIFEST_FILE
from anita_core.train.run_checkpoint import latest_checkpoint
from anita_core.train.run_identity import data_fingerprint, model_fingerprint
from anita_core.train.trainer import TrainConfig, Trainer
from tests.run_cli import metric_steps, run_script

BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def torch_backend_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ops.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_MODEL)


def _pairs(tokenizer, system_prompt=None, n=9):
    config = DPODataConfig(sample_path("dpo"), max_length=64, max_samples=n, seed=0,
                           system_prompt=system_prompt)
    return build_dpo_data(config, tokenizer).train


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return _pairs(tokenizer)


def _model(seed: int, dropout: float = 0.1):
    """Tiny base + LoRA with non-zero B (so the policy differs from the reference
    from the first step) and dropout on (so the RNG stream matters)."""
    model = load_model(BUNDLED_MODEL, progress=False, dropout_seed=seed)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=dropout, seed=seed),
                                       model.config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, projection in model.adapters.adapted():
            _, B = model.adapters.get(layer, projection)
            B.copy_(torch.randn(B.shape, generator=gen) * 0.05)
    return model


def _key(pairs, batches_seed, **changes):
    key = reference_key(model=model_fingerprint(BUNDLED_MODEL), reference=BASE_REFERENCE,
                        data=data_fingerprint(pairs), dtype=torch.float32, batch_size=BATCH,
                        seed=batches_seed, n_examples=len(pairs))
    return {**key, **changes}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_precomputed_reference_gives_bitwise_the_same_losses_and_gradients(
        tokenizer, pairs, fresh_seed, loss_type):
    model = _model(fresh_seed)
    train, held_out = pairs[:6], pairs[6:]
    batches = indexed_dpo_batches(train, batch_size=BATCH, pad_id=tokenizer.pad_id,
                                  shuffle_seed=fresh_seed)
    eval_batches = indexed_dpo_batches(held_out, batch_size=BATCH, pad_id=tokenizer.pad_id,
                                       first_index=len(train))
    indices = sum((b[INDEX_KEY].tolist() for b in batches + eval_batches), [])
    assert sorted(indices) == list(range(len(pairs)))
    beta = 0.02 if loss_type == "hinge" else 0.1      # hinge: keep beta * delta < 1, a gradient
    live = DPOObjective(model, beta=beta, loss_type=loss_type)
    store = compute_reference_logps(DPOObjective(model), batches + eval_batches, len(pairs),
                                    progress=False)
    assert store.complete
    stored = DPOObjective(model, beta=beta, loss_type=loss_type, reference_store=store)
    params = model.adapters.parameters()
    for k, batch in enumerate(batches):
        results = []
        for objective in (live, stored):
            model.dropout_generator.manual_seed(fresh_seed + k)   # the same dropout masks
            for p in params:
                p.grad = None
            sums = objective.micro_step(batch, grad_scale=1.0 / objective.units(batch))
            results.append((sums, [p.grad.clone() for p in params]))
        (live_sums, live_grads), (stored_sums, stored_grads) = results
        assert live_sums == stored_sums, f"batch {k}: {live_sums} != {stored_sums}"
        for i, (a, b) in enumerate(zip(live_grads, stored_grads)):
            assert torch.equal(a, b), f"batch {k} param {i}: max diff {(a - b).abs().max():.3e}"
        # not vacuous: the policy is off the reference, and the step has a gradient
        assert abs(stored_sums["rewards/chosen"]) > 0 and stored_sums["loss"] > 0
        assert any(float(g.abs().max()) > 0 for g in stored_grads)
    assert live.reference_passes == len(batches)
    assert stored.reference_passes == 0, "a step ran the reference although it was precomputed"
    live_eval, stored_eval = live.evaluate(eval_batches), stored.evaluate(eval_batches)
    assert live_eval == stored_eval and live_eval["eval_rewards/chosen"] != 0
    assert live.reference_passes == len(batches) + len(eval_batches)
    assert stored.reference_passes == 0, "evaluation ran the reference although it was precomputed"


def _trainer(model, objective, batches_for, out, max_steps):
    config = TrainConfig(output_dir=str(out), learning_rate=5e-3, gradient_accumulation_steps=2,
                         max_steps=max_steps, save_steps=1, progress=False)
    return Trainer(model, model.adapters, objective, batches_for, config, log=lambda m: None)


def test_resumed_run_loads_the_store_runs_no_reference_and_matches_the_live_run(
        tokenizer, pairs, tmp_path, fresh_seed):
    """Live reference for a whole epoch vs. precompute + stop after 1 step + resume
    (a new process would start from nothing: a new model, objective and trainer)."""
    steps = len(indexed_dpo_batches(pairs, batch_size=BATCH, pad_id=0)) // 2   # 1 epoch, accum 2

    def batches_for(epoch):
        return indexed_dpo_batches(pairs, batch_size=BATCH, pad_id=tokenizer.pad_id,
                                   shuffle_seed=fresh_seed + epoch)

    model = _model(fresh_seed)
    live = DPOObjective(model)
    _trainer(model, live, batches_for, tmp_path / "live", steps).train()
    assert live.reference_passes == 2 * steps

    logs = []
    key = _key(pairs, fresh_seed)
    for attempt, (max_steps, resume) in enumerate(((1, False), (steps, True))):
        model = _model(fresh_seed)
        objective = DPOObjective(model)
        objective.reference_store = prepare_reference_logps(
            objective, batches_for(0), tmp_path / "stored", key, resume=resume, log=logs.append,
            progress=False)
        assert objective.reference_passes == (len(batches_for(0)) if attempt == 0 else 0)
        passes = objective.reference_passes
        trainer = _trainer(model, objective, batches_for, tmp_path / "stored", max_steps)
        trainer.train(resume_from=latest_checkpoint(tmp_path / "stored") if resume else None)
        assert objective.reference_passes == passes, "a training step ran the reference model"
    assert "computed once" in logs[0] and "loaded from" in logs[1], logs

    def records(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records(tmp_path / "live"), records(tmp_path / "stored"), strict=True):
        a.pop("tokens_per_s"), b.pop("tokens_per_s")
        assert a == b
    live_final = load_file(str(latest_checkpoint(tmp_path / "live") / "adapter" / "adapter_model.safetensors"))
    stored_final = load_file(str(latest_checkpoint(tmp_path / "stored") / "adapter" / "adapter_model.safetensors"))
    for name in live_final:
        assert torch.equal(live_final[name], stored_final[name]), name


def test_store_files_and_stale_stores_are_detected(tokenizer, pairs, tmp_path, fresh_seed):
    model = _model(fresh_seed)
    batches = indexed_dpo_batches(pairs, batch_size=BATCH, pad_id=tokenizer.pad_id,
                                  shuffle_seed=fresh_seed)
    key = _key(pairs, fresh_seed)
    out = tmp_path / "run"

    def prepare(key, resume, batches=batches, run_dir=out):
        objective, logs = DPOObjective(model), []
        store = prepare_reference_logps(objective, batches, run_dir, key, resume=resume,
                                        log=logs.append, progress=False)
        return store, objective.reference_passes, " ".join(logs)

    first, passes, _ = prepare(key, resume=False)
    assert passes == len(batches)
    # plain files: safetensors tensors + the JSON key, and the manifest of both, nothing else
    folder = out / STORE_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted([KEY_FILE, LOGPS_FILE, MANIFEST_FILE])
    assert json.loads((folder / KEY_FILE).read_text()) == key
    tensors = load_file(str(folder / LOGPS_FILE))
    assert torch.equal(tensors["logps"], first.logps) and bool(tensors["computed"].all())
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp folder left behind"

    # a store covering only the batches a short run reached: a longer resume adds the rest
    partial = tmp_path / "partial"
    _, passes, _ = prepare(key, resume=False, batches=batches[:2], run_dir=partial)
    assert passes == 2
    _, passes, log = prepare(key, resume=True, run_dir=partial)
    assert passes == len(batches) - 2 and f"({2 * BATCH} loaded)" in log
    grown, passes, _ = prepare(key, resume=True, run_dir=partial)
    assert passes == 0 and torch.equal(grown.logps, first.logps)

    # a changed template (system prompt) changes the tokens, so the data key
    other_template = _pairs(tokenizer, system_prompt="Rispondi in italiano.")
    assert len(other_template) == len(pairs)
    reference_adapter = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, seed=1), model.config)
    changed_adapter = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, seed=1), model.config)
    with torch.no_grad():
        changed_adapter.parameters()[0][0, 0] += 1e-3
    stale_keys = {
        "data": _key(pairs, fresh_seed, data=data_fingerprint(other_template)),
        "reference": _key(pairs, fresh_seed, reference=adapters_fingerprint(reference_adapter)),
        "dtype": _key(pairs, fresh_seed, dtype="bfloat16"),
        "batching": _key(pairs, fresh_seed + 1),
    }
    assert adapters_fingerprint(changed_adapter) != adapters_fingerprint(reference_adapter)
    for field, stale in stale_keys.items():
        with pytest.raises(StaleReferenceStore, match=f"{field}: stored"):
            prepare(stale, resume=True)
        # refusing left the store as it was
        assert json.loads((folder / KEY_FILE).read_text()) == key
    _, passes, log = prepare(stale_keys["data"], resume=False)     # a fresh run recomputes
    assert passes == len(batches) and "stale (data: stored" in log
    assert json.loads((folder / KEY_FILE).read_text()) == stale_keys["data"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "old store left behind"

    # a damaged store (cut short, or bytes changed in place) is recomputed, with a warning naming it
    stored = (folder / LOGPS_FILE).read_bytes()
    (folder / LOGPS_FILE).write_bytes(stored[:7])
    again, passes, log = prepare(stale_keys["data"], resume=True)
    assert passes == len(batches) and f"{folder}: damaged: {LOGPS_FILE}: cut short" in log
    assert torch.equal(again.logps, first.logps)
    stored = bytearray((folder / LOGPS_FILE).read_bytes())
    stored[-1] ^= 0x01
    (folder / LOGPS_FILE).write_bytes(bytes(stored))
    again, passes, log = prepare(stale_keys["data"], resume=True)
    assert passes == len(batches) and f"{folder}: damaged: {LOGPS_FILE}: bytes changed" in log
    assert torch.equal(again.logps, first.logps)
    # a store from before manifests: checked by structure, and still used as it is
    (folder / MANIFEST_FILE).unlink()
    _, passes, _ = prepare(stale_keys["data"], resume=True)
    assert passes == 0
    (folder / LOGPS_FILE).write_bytes((folder / LOGPS_FILE).read_bytes()[:-4])
    _, passes, log = prepare(stale_keys["data"], resume=True)
    assert passes == len(batches) and "its header describes" in log
    # a temp folder a killed save left is removed
    orphan = out / f".{STORE_DIR}.killed"
    orphan.mkdir()
    _, passes, _ = prepare(stale_keys["data"], resume=True)
    assert passes == 0 and not orphan.exists()


def test_shards_merge_by_global_example_index(tokenizer, pairs, fresh_seed):
    """A data-parallel run can split the precompute: each rank computes its own
    batches, the stores merge into the one a single pass makes."""
    model = _model(fresh_seed)
    batches = indexed_dpo_batches(pairs, batch_size=BATCH, pad_id=tokenizer.pad_id,
                                  shuffle_seed=fresh_seed)
    whole = compute_reference_logps(DPOObjective(model), batches, len(pairs), progress=False)
    merged = ReferenceLogps.empty(len(pairs))
    for rank in range(2):
        shard = compute_reference_logps(DPOObjective(model), batches[rank::2], len(pairs),
                                        progress=False)
        assert not shard.complete
        merged.merge(shard)
    assert merged.complete and torch.equal(merged.logps, whole.logps)
    with pytest.raises(KeyError, match="no reference log-probs"):
        ReferenceLogps.empty(len(pairs)).lookup(batches[0][INDEX_KEY])


def test_train_dpo_precomputes_by_default_and_resume_reuses_it(tmp_path, monkeypatch):
    """Through the real script (the flag's default, the store kept in the run
    folder): computed once, then loaded by a --resume that replays steps 2-3 from
    the step-1 checkpoint with no reference pass, logging the same losses."""
    monkeypatch.setenv("ANITA_BACKEND", "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    args = ["--no-progress", "--eval-split", "2", "--batch-size", "2", "--max-samples", "8",
            "--max-length", "48", "--max-prompt-length", "0", "--save-steps", "1",
            "--save-total-limit", "0", "--gradient-accumulation-steps", "1", "--max-steps", "3",
            "--output-dir", out]
    proc = run_script("train_dpo.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"computed once, kept in {out / STORE_DIR}" in proc.stderr
    first_run = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    stored = load_file(str(out / STORE_DIR / LOGPS_FILE))
    proc = run_script("train_dpo.py", *args, "--resume", out / "checkpoints" / "step-00000001")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loaded from {out / STORE_DIR}" in proc.stderr and "computed once" not in proc.stderr
    resumed = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert metric_steps(out) == [1, 2, 3]
    for a, b in zip(first_run, resumed, strict=True):
        a.pop("tokens_per_s", None), b.pop("tokens_per_s", None)
        assert a == b
    assert torch.equal(load_file(str(out / STORE_DIR / LOGPS_FILE))["logps"], stored["logps"])


def test_a_reference_free_loss_from_the_table_runs_no_reference_pass(tokenizer, pairs, fresh_seed):
    """The DPO objective takes its loss as a value (train.preference_losses.PreferenceLoss):
    a reference-free one gets reference=None and no reference forward, and its loss is
    what the step reports and differentiates; a reference loss still runs the reference."""
    import torch.nn.functional as F

    from anita_core.train.preference_losses import PREFERENCE_LOSSES, PreferenceLoss
    seen = []

    def odds_free(policy, reference, options):      # a reference-free margin loss, for the test
        seen.append(reference)
        loss = -F.logsigmoid(options["beta"] * (policy.chosen / policy.chosen_tokens
                                                - policy.rejected / policy.rejected_tokens)).mean()
        return loss, {"logps/chosen": policy.chosen.detach().mean()}

    (batch,) = indexed_dpo_batches(pairs[:BATCH], batch_size=BATCH, pad_id=tokenizer.pad_id)
    model = _model(fresh_seed, dropout=0.0)
    free = DPOObjective(model, beta=0.5, loss=PreferenceLoss(odds_free, False, ("logps/chosen",),
                                                                {"beta": 0.1}))
    sums = free.micro_step(batch, grad_scale=1.0)
    assert free.reference_passes == 0 and seen == [None]
    assert torch.isfinite(sums["loss"]) and float(sums["loss"]) > 0
    grads = [p.grad for p in model.adapters.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().max()) > 0 for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert set(sums) >= {"loss", "tokens", "computed", "logps/chosen"}

    with_reference = DPOObjective(_model(fresh_seed, dropout=0.0), loss=PREFERENCE_LOSSES["sigmoid"])
    with_reference.micro_step(batch, grad_scale=1.0)
    assert with_reference.reference_passes == 1
