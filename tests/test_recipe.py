"""The whole LLaMAntino-3-ANITA recipe on a real chat model nobody on this project wrote
(SmolLM2-135M-Instruct, ChatML tokenizer), through the command lines, scaled down to a
few steps per stage:

    SFT (--template chat) -> DPO (--template chat, --init-adapter the SFT adapter,
    --exclude-sources toxic-dpo, --merge-export) -> Italian adaptation (raw text) on the
    merged model -> eval.py on a local multiple-choice task with the last adapter.

Every stage must exit 0 and write a PEFT adapter (eval: lm-eval's results JSON); each
stage's wall time is printed. The commands are those of docs/smollm2.md ("The whole recipe on SmolLM2").
Opt-in, marker ``real_model`` (minutes: SmolLM2 loads four times):

    pytest -m real_model tests/test_recipe.py -s
"""
from __future__ import annotations

import json
import os
import time

import pytest

from anita_core.assets import sample_path
from tests.eval_tasks import TASK, write_task
from tests.run_cli import run_script

pytestmark = pytest.mark.real_model

COMMON = ["--threads", "1", "--no-progress", "--eval-split", "0", "--optimizer", "adamw",
          "--gradient-accumulation-steps", "1", "--save-minutes", "0"]


def stages(model, out, tasks):
    """(name, script, arguments) of each stage, in order."""
    return [
        ("sft", "train_sft.py", ["--model", model, "--template", "chat", "--data", sample_path("instruction"),
                                 "--max-samples", "32", "--no-packing", "--max-seq-length", "256",
                                 "--batch-size", "4", "--max-steps", "4", "--lora-alpha", "32",
                                 "--learning-rate", "1e-3", "--warmup-steps", "0", *COMMON,
                                 "--output-dir", f"{out}/sft"]),
        ("dpo", "train_dpo.py", ["--preset", "dpo", "--model", model, "--template", "chat",
                                 "--data", sample_path("dpo_messages"), "--init-adapter", f"{out}/sft/adapter",
                                 "--exclude-sources", "toxic-dpo", "--max-samples", "16",
                                 "--max-length", "256", "--max-prompt-length", "128", "--batch-size", "2",
                                 "--max-steps", "2", *COMMON, "--merge-export", f"{out}/merged",
                                 "--output-dir", f"{out}/dpo"]),
        ("ita", "train_sft.py", ["--preset", "ita", "--model", f"{out}/merged", "--data", sample_path("text"),
                                 "--max-samples", "16", "--max-seq-length", "256", "--batch-size", "2",
                                 "--max-steps", "2", "--warmup-steps", "0", *COMMON,
                                 "--output-dir", f"{out}/ita"]),
        ("eval", "eval.py", ["--model", f"{out}/merged", "--adapter", f"{out}/ita/adapter", "--tasks", TASK,
                             "--include-path", str(tasks), "--threads", "1", "--no-progress",
                             "--output", f"{out}/eval/results.json"]),
    ]


def test_sft_dpo_ita_eval_on_smollm2(tmp_path):
    from anita_core.assets.smollm2 import ensure_smollm2
    model = str(ensure_smollm2(os.environ.get("ANITA_SMOLLM2_DIR")))
    tasks = write_task(tmp_path / "tasks")
    times = {}
    for name, script, args in stages(model, tmp_path, tasks):
        started = time.perf_counter()
        # the CPU path, as a user's run on a CPU gets (tests/conftest.py pins the kernels)
        done = run_script(script, *args, timeout=3600, ANITA_BACKEND="torch")
        times[name] = time.perf_counter() - started
        assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stderr[-4000:]}"
        print(f"[recipe] {name}: {times[name]:.0f} s; {done.stderr.strip().splitlines()[-1]}", flush=True)
        if name != "eval":
            adapter = tmp_path / name / "adapter"
            config = json.loads((adapter / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    print("[recipe] stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
