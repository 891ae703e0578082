"""The commands on every model family: SFT -> DPO (with --merge-export) ->
evaluation -> chat, each through its CLI, on a tiny random Mistral, Qwen2 and
Qwen3 whose folders hold a tokenizer with that family's chat layout (ChatML for
Qwen, [INST] for Mistral; tests/chat_tokenizers.py), on the CPU path
(ANITA_BACKEND=torch). Each stage must exit 0 and leave what it promises: a
PEFT adapter, a merged export transformers reads as the family's class, lm-eval
results, a chat answer from the base model and one with the adapter."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from anita_core.assets import sample_path
from anita_core.data import load_tokenizer
from anita_core.model.families import FAMILIES
from tests.chat_tokenizers import CHATML, INST, write_tokenizer
from tests.eval_tasks import TASK, write_task
from tests.model_factory import make_tiny_model_dir
from tests.run_cli import REPO, run_script

COMMON = ["--threads", "1", "--no-progress", "--eval-split", "0", "--optimizer", "adamw",
          "--gradient-accumulation-steps", "1", "--save-minutes", "0"]
TOKENIZER_KIND = {"mistral": ("inst", INST), "qwen2": ("chatml", CHATML), "qwen3": ("chatml", CHATML)}


def family_chat_model(tmp_path, family):
    kind, template = TOKENIZER_KIND[family]
    tok_dir = write_tokenizer(tmp_path / f"tok-{kind}", kind, template)
    size = load_tokenizer(str(tok_dir)).vocab_size
    ckpt = make_tiny_model_dir(tmp_path, family, vocab_size=size, hidden_size=64,
                               intermediate_size=100, num_heads=4, num_kv_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, ckpt / name)
    return ckpt


def _run(script, *args):
    done = run_script(script, *args, timeout=900, ANITA_BACKEND="torch")
    assert done.returncode == 0, f"{script}: exit {done.returncode}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.parametrize("family", ("mistral", "qwen2", "qwen3"))
def test_sft_dpo_eval_chat_on_each_family(tmp_path, family):
    from transformers import AutoConfig

    model = str(family_chat_model(tmp_path, family))
    out = tmp_path / "runs"
    _run("train_sft.py", "--model", model, "--template", "chat", "--data", sample_path("instruction"),
         "--max-samples", "8", "--no-packing", "--max-seq-length", "96", "--batch-size", "2",
         "--max-steps", "2", "--warmup-steps", "0", *COMMON, "--output-dir", f"{out}/sft")
    _run("train_dpo.py", "--preset", "dpo", "--model", model, "--template", "chat",
         "--data", sample_path("dpo_messages"), "--init-adapter", f"{out}/sft/adapter",
         "--max-samples", "4", "--max-length", "96", "--max-prompt-length", "48",
         "--batch-size", "2", "--max-steps", "2", *COMMON, "--merge-export", f"{out}/merged",
         "--output-dir", f"{out}/dpo")
    for stage in ("sft", "dpo"):
        config = json.loads((out / stage / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
    merged = AutoConfig.from_pretrained(out / "merged")
    assert merged.model_type == family
    assert merged.architectures == [FAMILIES[family].architecture]

    tasks = write_task(tmp_path / "tasks")
    _run("eval.py", "--model", model, "--adapter", f"{out}/dpo/adapter", "--tasks", TASK,
         "--include-path", str(tasks), "--threads", "1", "--no-progress",
         "--output", f"{out}/eval/results.json")
    results = json.loads((out / "eval" / "results.json").read_text())
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0

    chat = _run("chat.py", "--model", model, "--adapter", f"{out}/dpo/adapter",
                "--max-new-tokens", "3", "--threads", "1", "Qual è la capitale d'Italia?")
    assert "### base model" in chat.stdout and "### with adapter" in chat.stdout
    merged_chat = _run("chat.py", "--model", f"{out}/merged", "--max-new-tokens", "3",
                       "--threads", "1", "Ciao")
    assert "### base model" in merged_chat.stdout


@pytest.mark.parametrize("family", ("mistral", "qwen2", "qwen3"))
def test_bench_train_runs_each_family_against_its_transformers_class(tmp_path, family):
    """bench/train.py --family (what the GPU session's train steps take): anita and
    transformers' own class of the family (+ PEFT + bitsandbytes, the same NF4 codes)
    train the same smoke model, and their first-step losses agree (bench/train_checks)."""
    out = tmp_path / "train.csv"
    done = subprocess.run([sys.executable, "-m", "bench.train", "--smoke", "--no-progress",
                           "--no-plot", "--family", family, "--frameworks", "anita,hf_peft_bnb",
                           "--no-max-seq", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["framework"]: r for r in csv.DictReader(out.open()) if r["measurement"] == "throughput"}
    assert set(rows) == {"anita", "hf_peft_bnb"}
    assert all(r["status"] == "ok" and f"smoke-{family}" in r["model"] for r in rows.values())
    assert rows["hf_peft_bnb"]["loss_check"].startswith("ok: first-step loss"), rows["hf_peft_bnb"]["loss_check"]


@pytest.mark.parametrize("family", ("llama", "mistral", "qwen2", "qwen3"))
def test_gpu_session_and_planner_know_each_family(family):
    """The GPU session's training steps take --family, and the family's GPU shape
    (bench/shapes.GPU_DIMS) is a config transformers builds as that family's class,
    that the memory planner plans (the per-head q/k norm buffers counted for Qwen3)."""
    from pathlib import Path

    from transformers import AutoConfig

    from dataclasses import replace

    from anita_core.memory.planner import StepShape, activation_peak
    from bench import session
    from bench.shapes import GPU_DIMS

    command = session.step_command("train_anita", Path("/o"), False, "py", family)
    assert command[command.index("--family") + 1] == family
    assert ("--layers" in command) == (family == "llama")
    config = GPU_DIMS[family].model_config()
    hf = AutoConfig.for_model(**config.to_hf_dict())
    assert type(hf).__name__.lower().startswith(family)
    assert (hf.num_hidden_layers, hf.head_dim) == (config.num_hidden_layers, config.head_dim)
    # the planner counts what the family's block holds: a kept Qwen3 layer keeps its q/k
    # norms' inputs and rstd beside LLaMA's, so the same shape read as a plain llama
    # predicts less, by those bytes per token row
    shape = StepShape(batch=1, seq=2048, lora_rank=16)
    config2 = GPU_DIMS[family].model_config(layers=2)
    plain = replace(config2, model_type="llama", qkv_bias=False, qk_norm=False, layer_windows=None)
    ours, theirs = (activation_peak(c, shape, ["keep", "keep"]) for c in (config2, plain))
    if family == "qwen3":
        d = config2.head_dim
        per_row = (config2.num_attention_heads + config2.num_key_value_heads) * (d * 2 + 4)
        assert ours - theirs >= 2 * shape.tokens * per_row
    else:
        assert ours == theirs
