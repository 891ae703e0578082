"""DPO data pipeline: both row shapes, the source filter, TRL 1.16's
tokenization and truncation (checked against DPOTrainer itself), the earlier
TRL max_prompt_length rule on crafted pairs, and the batch contract."""
from __future__ import annotations

import json
import os

import pytest
import torch

from anita_core.assets import TOKENIZER_DIR, sample_path
from anita_core.data import (IGNORE_INDEX, BadRowError, DPODataConfig, PreferencePair,
                             build_dpo_data, check_batch, collate_pairs, dpo_batches,
                             load_tokenizer, shuffled, to_hf_batch, tokenize_pairs, truncate_pair)
from anita_core.data.rows import check_dpo_row
from tests.helpers import sample_rows


EOT = "<|eot_id|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def _writesample_rows(tmp_path, rows, name="pairs.jsonl"):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------ row shapes
def test_string_and_message_shapes_tokenize_alike(tok):
    string_row = {"prompt": "Qual è il capoluogo della regione Umbria?",
                  "chosen": " Perugia. ", "rejected": "Bari."}
    messages = [{"role": "user", "content": "Qual è il capoluogo della regione Umbria?"}]
    message_row = {"source": "x", "prompt": "ignored when chosen is a list",
                   "chosen": messages + [{"role": "assistant", "content": "Perugia."}],
                   "rejected": messages + [{"role": "assistant", "content": "Bari."}]}
    explicit_row = {"prompt": messages, "chosen": [{"role": "assistant", "content": "Perugia."}],
                    "rejected": [{"role": "assistant", "content": "Bari."}]}
    pairs = tokenize_pairs([check_dpo_row(r) for r in (string_row, message_row, explicit_row)], tok)
    for pair in pairs:
        assert tok.decode(pair.prompt_ids) == (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQual è il capoluogo della "
            "regione Umbria?" + EOT + "<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert tok.decode(pair.chosen_ids) == "Perugia." + EOT
        assert tok.decode(pair.rejected_ids) == "Bari." + EOT
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == \
               (pairs[0].prompt_ids, pairs[0].chosen_ids, pairs[0].rejected_ids)
    assert pairs[1].source == "x" and pairs[0].source is None
    system = tokenize_pairs([check_dpo_row(string_row)], tok, system_prompt="Sii breve.")[0]
    assert tok.decode(system.prompt_ids).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSii breve." + EOT)


def test_source_filter_drops_listed_sources(tok, tmp_path):
    rows = sample_rows("dpo_messages")
    toxic = sum(r["source"] == "toxic-dpo" for r in rows)
    data = build_dpo_data(DPODataConfig(sample_path("dpo_messages"), max_length=None,
                                        exclude_sources=["toxic-dpo"]), tok)
    assert data.stats.filtered_by_source == toxic > 0
    assert data.stats.examples == len(rows) - toxic
    assert all(p.source != "toxic-dpo" for p in data.train)
    unfiltered = build_dpo_data(DPODataConfig(sample_path("dpo_messages"), max_length=None), tok)
    assert unfiltered.stats.filtered_by_source == 0 and unfiltered.stats.examples == len(rows)
    # a malformed row of an excluded source is dropped, not reported
    bad_toxic = {"source": "toxic-dpo", "prompt": "x", "chosen": 3, "rejected": None}
    path = _writesample_rows(tmp_path, rows[:4] + [bad_toxic])
    data = build_dpo_data(DPODataConfig(path, exclude_sources={"toxic-dpo"}), tok)
    assert data.stats.filtered_by_source == 1 + sum(r["source"] == "toxic-dpo" for r in rows[:4])


# ------------------------------------------------------------------ truncation
def test_truncation_without_max_prompt_length_is_trl_1_16s():
    p, c, r = list(range(10)), list(range(100, 114)), list(range(200, 203))
    (tp, tc, tr), truncated = truncate_pair(p, c, r, max_length=20)
    assert truncated and (tp, tc, tr) == (p, c[:10], r)            # prompt whole, completion cut
    assert truncate_pair(p, c[:5], r, max_length=20) == ((p, c[:5], r), False)
    assert truncate_pair(list(range(20)), c, r, max_length=20) == (None, False)   # prompt fills it
    (tp, tc, tr), truncated = truncate_pair(list(range(19)), c, r, max_length=20)
    assert truncated and (len(tp), tc, tr) == (19, c[:1], r[:1])
    assert truncate_pair(list(range(500)), c, r, max_length=None) == ((list(range(500)), c, r), False)


def test_truncation_with_max_prompt_length_follows_trl_tokenize_row():
    """TRL <= 0.11 DPOTrainer.tokenize_row, truncation_mode="keep_end", worked by hand."""
    P = lambda n: list(range(n))
    C = lambda n: list(range(100, 100 + n))
    R = lambda n: list(range(200, 200 + n))
    # fits: untouched
    assert truncate_pair(P(10), C(6), R(4), max_length=20, max_prompt_length=8) == \
           ((P(10), C(6), R(4)), False)
    # 10 + 14 > 20: prompt keeps its last 8; 8 + 14 > 20: completions keep 20 - 8 = 12
    assert truncate_pair(P(10), C(14), R(3), max_length=20, max_prompt_length=8) == \
           ((P(10)[2:], C(12), R(3)), True)
    # long prompt, short completions: only the prompt's start goes (BOS with it)
    assert truncate_pair(P(30), C(5), R(7), max_length=20, max_prompt_length=8) == \
           ((P(30)[22:], C(5), R(7)), True)
    # short prompt, long completion: cut to max_length - max_prompt_length, not to what is left
    assert truncate_pair(P(5), C(30), R(2), max_length=20, max_prompt_length=8) == \
           ((P(5), C(12), R(2)), True)
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate_pair(P(5), C(3), R(3), max_length=20, max_prompt_length=20)


@pytest.fixture(scope="module")
def trl_run(tok, tmp_path_factory):
    """TRL 1.16's DPOTrainer tokenizing and collating the same pairs."""
    import transformers
    import trl
    import datasets
    rows = [check_dpo_row(r) for r in sample_rows("dpo")[:25] + sample_rows("dpo_messages")[:25]]
    long_prompt = {"prompt": [{"role": "user", "content": "Ripeti: " + "la la " * 40}],
                   "chosen": "la", "rejected": "no", "source": None}
    long_answer = {"prompt": [{"role": "user", "content": "Conta."}],
                   "chosen": "uno due tre " * 20, "rejected": "no", "source": None}
    rows += [long_prompt, long_answer]
    max_length = 45
    hf_tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    conversational = datasets.Dataset.from_list([
        {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True,
                         max_length=max_length, report_to="none", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=transformers.LlamaForCausalLM(config),
                             ref_model=transformers.LlamaForCausalLM(config), args=args,
                             train_dataset=conversational, processing_class=hf_tok)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return rows, max_length, examples, trainer.data_collator, hf_tok.pad_token_id


def test_tokenization_and_truncation_match_trl_dpo_trainer(tok, tmp_path, trl_run):
    rows, max_length, trl_examples, trl_collator, trl_pad = trl_run
    assert trl_pad == tok.pad_id
    ours = tokenize_pairs(rows, tok)
    kept = []
    for pair in ours:
        result, _ = truncate_pair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids,
                                  max_length=max_length)
        if result is not None:
            kept.append((pair, result))
    # the same pairs survive, tokenized identically (TRL keeps ids untruncated here)
    assert len(kept) == len(trl_examples)
    for (pair, _), example in zip(kept, trl_examples):
        assert pair.prompt_ids == example["prompt_ids"]
        assert pair.chosen_ids == example["chosen_ids"]
        assert pair.rejected_ids == example["rejected_ids"]
    # the collated batch: TRL stacks chosen then rejected, truncates, pads
    pairs = [PreferencePair(*result) for _, result in kept]
    for start in range(0, len(pairs), 7):
        batch = collate_pairs(pairs[start:start + 7], pad_id=tok.pad_id)
        expected = trl_collator(trl_examples[start:start + 7])
        ids = torch.cat([batch["chosen"]["input_ids"], batch["rejected"]["input_ids"]])
        seg = torch.cat([batch["chosen"]["segment_ids"], batch["rejected"]["segment_ids"]])
        targets = torch.cat([batch["chosen"]["targets"], batch["rejected"]["targets"]])
        assert torch.equal(ids, expected["input_ids"])
        assert torch.equal((seg >= 0).long(), expected["attention_mask"])
        # TRL's log-probs use input_ids[:, 1:] where completion_mask[:, 1:] is set
        shifted = torch.full_like(ids, IGNORE_INDEX)
        shifted[:, :-1] = torch.where(expected["completion_mask"][:, 1:].bool(), ids[:, 1:],
                                      torch.tensor(IGNORE_INDEX))
        assert torch.equal(targets, shifted)
    # the counts reported by the pipeline agree
    path = _writesample_rows(tmp_path, [{"prompt": r["prompt"][-1]["content"],
                                    "chosen": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}],
                                    "rejected": r["prompt"] + [{"role": "assistant", "content": r["rejected"]}]}
                                   for r in rows])
    data = build_dpo_data(DPODataConfig(path, max_length=max_length), tok)
    assert data.stats.dropped_too_long == len(rows) - len(trl_examples) > 0
    assert data.stats.truncated == sum(
        len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) > max_length
        for p, _ in kept) > 0


# ------------------------------------------------------------------ batches
def test_pair_batches_follow_the_contract(tok):
    data = build_dpo_data(DPODataConfig(sample_path("dpo"), max_length=64, eval_split=0.1, seed=5), tok)
    s = data.stats
    assert s.dropped_too_long > 0 and s.truncated > 0
    assert s.examples == s.rows_read - s.dropped_too_long
    assert s.eval_examples == len(data.eval) == s.examples // 10          # 10 % held out
    assert s.train_examples == len(data.train) == s.examples - s.eval_examples
    batches = dpo_batches(data.train, batch_size=5, pad_id=tok.pad_id, shuffle_seed=1)
    again = dpo_batches(data.train, batch_size=5, pad_id=tok.pad_id, shuffle_seed=1)
    other = dpo_batches(data.train, batch_size=5, pad_id=tok.pad_id, shuffle_seed=2)
    assert all(torch.equal(a["chosen"]["input_ids"], b["chosen"]["input_ids"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["chosen"]["input_ids"], b["chosen"]["input_ids"])
                   for a, b in zip(batches, other))
    order = shuffled(data.train, 1)
    for k, batch in enumerate(batches):
        chosen, rejected = batch["chosen"], batch["rejected"]
        check_batch(chosen)
        check_batch(rejected)
        assert chosen["input_ids"].shape == rejected["input_ids"].shape
        pairs = order[5 * k:5 * k + 5]
        width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
        assert chosen["input_ids"].shape == (len(pairs), width) and width <= 64
        for b, pair in enumerate(pairs):
            for half, completion in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
                n = len(pair.prompt_ids) + len(completion)
                assert half["input_ids"][b, :n].tolist() == pair.prompt_ids + completion
                # targets: exactly the completion tokens, predicted from the position before
                targets = half["targets"][b].tolist()
                assert targets[:len(pair.prompt_ids) - 1] == [IGNORE_INDEX] * (len(pair.prompt_ids) - 1)
                assert targets[len(pair.prompt_ids) - 1:n - 1] == completion
                assert all(t == IGNORE_INDEX for t in targets[n - 1:])
    hf = to_hf_batch(batches[0]["chosen"])
    assert torch.equal(hf["labels"][:, 1:], batches[0]["chosen"]["targets"][:, :-1])


# ------------------------------------------------------------------ malformed rows
_P = [{"role": "user", "content": "Ciao?"}]
_A = lambda text: [{"role": "assistant", "content": text}]
GOOD = {"source": "s", "prompt": "Ciao?", "chosen": _P + _A("Ciao!"), "rejected": _P + _A("No.")}
MALFORMED = [
    ({"source": "s", "chosen": _P + _A("a"), "rejected": [{"role": "user", "content": "Altro?"}] + _A("b")},
     "differ before their last message"),
    ({"source": "s", "chosen": _P + _A("a"), "rejected": _P}, "must be the assistant's answer"),
    ({"source": "s", "chosen": _P + _A(" "), "rejected": _P + _A("b")}, "answer in 'chosen' is empty"),
    ({"source": "s", "chosen": _A("a"), "rejected": _A("b")}, "no prompt"),
    ({"source": "s", "chosen": _P + _A("a"), "rejected": "b"}, "'rejected' must be a list"),
    ({"source": 7, "chosen": _P + _A("a"), "rejected": _P + _A("b")}, "'source' must be a string"),
    ({"source": "s", "prompt": None, "chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"source": "s", "prompt": "p", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"source": "s", "prompt": "p", "chosen": None, "rejected": "b"}, "missing field 'chosen'"),
]


@pytest.mark.parametrize("bad,problem", MALFORMED)
def test_malformed_pair_error_names_file_and_row(tok, tmp_path, bad, problem):
    path = _writesample_rows(tmp_path, [GOOD, bad, GOOD, GOOD, GOOD], "bad_pairs.jsonl")
    with pytest.raises(BadRowError, match=rf"bad_pairs\.jsonl: row 2: .*{problem}"):
        build_dpo_data(DPODataConfig(path), tok)
    data = build_dpo_data(DPODataConfig(path, skip_bad_rows=True), tok)
    assert (data.stats.rows_read, data.stats.skipped_bad_rows, data.stats.examples) == (5, 1, 4)
