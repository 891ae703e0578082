"""eval.py and anita's lm-eval LM, offline: a local multiple-choice task (YAML + jsonl
written here) scored by anita's model (NF4 base + a LoRA adapter with a large
non-zero B, torch backend, fp32) and by lm-eval's own HF model (HFLM) on
  - the merged export (train's --merge-export: nf4_dequantize(W) + B A in fp32), and
  - the unmerged adapter through ``peft=`` on the dequantized base (the NF4 weights
    exported with no delta: the base the adapter was trained on, in fp32);
per-document log-likelihoods agree to fp32 rounding and the accuracies are
identical. Also loglikelihood_rolling over several windows and greedy generate_until
against HFLM's, and the command's errors (unknown task; a hub task offline).

Tolerance, per log-likelihood of n continuation tokens: log-softmax moves by at most
2 max_j |dz_j| for a change dz of the logits, so |d ll| <= 2 n max|dz|. The two sides
differ only in fp32 summation order ((W + BA) x against W x + B (A x), packed rows
against padded batches): a K-term fp32 dot product errs by at most K u (u = 2^-24)
relative to the sum of its terms' magnitudes, K ~ 600 along this 2-layer path (hidden
64, MLP 100, <= 64 positions, rank 4, twice), 3.6e-5, amplified at most ~3x by the
RMS norms: REL = 1e-4 of max|z| (the bound tests/test_model_vs_hf.py uses for
anita's logits against transformers')."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# lm-eval is in the test extra, so on the CPU machines (CI) a missing install is an
# error, not a skip; only a lent GPU machine, which ships without it, skips
try:
    import lm_eval  # noqa: F401
except ImportError:
    if torch.cuda.is_available():
        pytest.skip("lm-eval is not installed on this GPU machine", allow_module_level=True)
    raise

from anita_core.assets import TOKENIZER_DIR  # noqa: E402
from anita_core.data import load_tokenizer  # noqa: E402
from tests import eval_tasks  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.model_factory import make_tiny_llama_dir  # noqa: E402

REL = 1e-4
ROOT = Path(__file__).resolve().parents[1]
TASK = eval_tasks.TASK
write_task = eval_tasks.write_task


@pytest.fixture(scope="module", autouse=True)
def torch_backend():
    """anita's side runs on the torch backend, the CPU path eval.py takes on a CPU (the
    kernels' own parity with it is tests/test_torch_backend.py's)."""
    from anita_core.model.ops import use_backend
    with use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, torch_backend):
    """(base folder, adapter folder, merged export, dequantized base, task folder, model)."""
    from anita_core.hf import load_model
    from anita_core.hf.export import export_merged
    from anita_core.lora import LoRAAdapters, LoRAConfig, save_peft
    root = tmp_path_factory.mktemp("eval")
    tok = load_tokenizer(TOKENIZER_DIR)
    base = make_tiny_llama_dir(root, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=100,
                               num_heads=4, num_kv_heads=2, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(TOKENIZER_DIR) / name, base / name)
    model = load_model(base, progress=False)
    adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, seed=5), model.config)
    with torch.no_grad():
        for layer, projection in adapters.adapted():
            adapters.get(layer, projection)[1].copy_(torch.randn_like(adapters.get(layer, projection)[1]) * 0.5)
    adapter_dir = save_peft(adapters, root / "adapter")
    merged = export_merged(model.config, model.base, {k: adapters.delta(*k) for k in adapters.adapted()},
                           root / "merged", tokenizer_dir=base)
    dequantized = export_merged(model.config, model.base, None, root / "dequantized", tokenizer_dir=base)
    model.adapters = adapters
    return base, adapter_dir, merged, dequantized, write_task(root / "tasks"), model


def _evaluate(lm, task_folder):
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    # only the local task's folder is indexed (lm-eval's thousands of built-in YAMLs are not)
    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    out = evaluator.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=True)
    docs = sorted(out["samples"][TASK], key=lambda d: d["doc_id"])
    return out["results"][TASK]["acc,none"], docs


def _hflm(pretrained, **kwargs):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(pretrained), dtype="float32", device="cpu", batch_size=4, **kwargs)


def _bound(lm, context_ids, continuation_ids) -> float:
    """2 n REL max|z| over the logits anita computes for one scored sequence."""
    ids = torch.tensor([(context_ids + continuation_ids)[:-1]])
    z = lm.model.logits(ids)[0, -len(continuation_ids):]
    return 2 * len(continuation_ids) * REL * float(z.abs().max())


def _bounds(lm, docs):
    """Per document, per choice: the bound of its (context, continuation) request."""
    return [[_bound(lm, *lm._encode_pair(*args)) for args in doc["arguments"]] for doc in docs]


def test_loglikelihoods_equal_lm_evals_hf_model_merged_and_through_peft(setup):
    from anita_core.eval.lm import AnitaLM
    base, adapter_dir, merged, dequantized, tasks, model = setup
    ours = AnitaLM(model, load_tokenizer(str(base)), progress=False)
    acc, docs = _evaluate(ours, tasks)
    bounds = _bounds(ours, docs)
    hfs = (_hflm(merged), _hflm(dequantized, peft=str(adapter_dir)))
    for reference in hfs:
        ref_acc, ref_docs = _evaluate(reference, tasks)
        assert acc == ref_acc
        got, want, bound = [], [], []
        for doc, ref, doc_bounds in zip(docs, ref_docs, bounds):
            assert doc["doc_id"] == ref["doc_id"] and doc["acc"] == ref["acc"]
            got += [ll for ll, _ in doc["filtered_resps"]]
            want += [ll for ll, _ in ref["filtered_resps"]]
            bound += doc_bounds
            assert len(got) == len(want) == len(bound)
        got, want, bound = (torch.tensor(x, dtype=torch.float64) for x in (got, want, bound))
        label = "merged export" if reference is hfs[0] else "peft= on the dequantized base"
        assert_close("eval_vs_lm_eval loglikelihood", label, got, want, atol=float("inf"), rtol=0.0)
        assert_close("eval_vs_lm_eval (units of bound)", label, got / bound, want / bound, atol=1.0, rtol=0.0)
    # not vacuous: the adapter moves the answers away from the base's
    plain = AnitaLM(model, ours.tok, progress=False)
    saved, model.adapters = model.adapters, None
    try:
        _, base_docs = _evaluate(plain, tasks)
    finally:
        model.adapters = saved
    moved = max(abs(a[0] - b[0]) for d, e in zip(docs, base_docs)
                for a, b in zip(d["filtered_resps"], e["filtered_resps"]))
    assert moved > 100 * max(max(b) for b in bounds)


def _instance(kind, args):
    from lm_eval.api.instance import Instance
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_loglikelihood_and_generation_equal_hf(setup):
    from anita_core.eval.lm import AnitaLM
    base, _, merged, _, _, model = setup
    texts = ["Il mare d'inverno è grigio e il vento porta la sabbia fino alle case del paese.",
             "Ciao!"]
    ours = AnitaLM(model, load_tokenizer(str(base)), max_length=16, progress=False)
    hf = _hflm(merged, max_length=16)
    from lm_eval import utils as lm_utils
    requests = [_instance("loglikelihood_rolling", (t,)) for t in texts]
    got, want = ours.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests)
    for text, g, w in zip(texts, got, want):
        windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            ours.tok_encode(text), ours.prefix_token_id, 16, 1)))
        assert len(windows) > (2 if text == texts[0] else 0)      # several windows for the long one
        bound = sum(_bound(ours, ctx, cont) for ctx, cont in windows)
        assert abs(g - w) <= bound, (g, w, bound)
    gen = [_instance("generate_until", ("Domanda: Qual è la capitale d'Italia?\nRisposta:",
                                        {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}))]
    assert ours.generate_until(gen) == hf.generate_until(gen)


def _eval_cli(args, env=None):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_writes_lm_evals_results_json(setup, tmp_path, capsys):
    from anita_core.eval.cli import main
    base, adapter_dir, merged, _, tasks, _ = setup
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--model", str(base), "--adapter", str(adapter_dir), "--tasks", TASK,
                     "--include-path", str(tasks), "--output", str(out), "--threads", "1",
                     "--log-samples", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    results = json.loads(out.read_text())
    ref_acc, ref_docs = _evaluate(_hflm(merged), tasks)
    assert results["results"][TASK]["acc,none"] == ref_acc
    assert results["n-shot"][TASK] == 0 and TASK in results["configs"]
    samples = [json.loads(line) for line in (tmp_path / f"samples_{TASK}.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [d["doc_id"] for d in ref_docs]
    assert f"evaluating with anita's model, NF4 base + adapter {adapter_dir}" in err


def test_unknown_task_and_offline_hub_task_are_one_line_errors(setup, tmp_path, capsys):
    """Through the command, with local task folders only (indexing lm-eval's built-in tasks
    takes tens of seconds): an unknown name; a task whose dataset is a hub dataset
    (arc_it's), offline: each stops before the model loads with one line."""
    from anita_core.eval.cli import main
    base, _, _, _, tasks, _ = setup
    with pytest.raises(SystemExit) as e:
        main(["--model", str(base), "--tasks", "no_such_task", "--include-path", str(tasks),
              "--no-builtin-tasks"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-2] == (
        "eval.py: error: argument --tasks: unknown task 'no_such_task'; list the available ones with "
        "`lm-eval ls tasks` (local task YAMLs: `lm-eval ls tasks --include_path DIR`, here "
        "--include-path DIR)")
    hub = tmp_path / "hub_tasks"
    hub.mkdir()
    (hub / "hub_arc.yaml").write_text((tasks / f"{TASK}.yaml").read_text().replace(
        f"task: {TASK}", "task: hub_arc").split("dataset_path:")[0]
        + "dataset_path: alexandrainst/m_arc\ndataset_name: it\ntest_split: test\n"
        + "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: 0\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = _eval_cli(["--model", str(base), "--tasks", "hub_arc", "--include-path", str(hub),
                      "--output", str(tmp_path / "r.json")], env=env)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-2]       # then the pointer to --help
    assert last.startswith("eval.py: error: argument --tasks: task 'hub_arc': dataset "
                           "alexandrainst/m_arc (it) could not be loaded (offline, or not on the hub?)"), \
        done.stderr
    assert "evaluating with" not in done.stderr and not (tmp_path / "r.json").exists()


def test_preset_is_the_papers_tasks_and_shots():
    from anita_core.eval.tasks import PRESETS, requested
    assert PRESETS["anita"] == {"arc_it": 0, "hellaswag_it": 0, "m_mmlu_it": 5}
    assert requested(None, "anita", None) == PRESETS["anita"]
    assert requested(["a", "b"], None, 3) == {"a": 3, "b": 3}
