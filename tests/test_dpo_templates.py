"""train_dpo.py --template chat|llama3|none: pairs rendered with the tokenizer's own
chat template (ChatML, Mistral-style [INST]) or as raw text, tokenized exactly as
TRL 1.16's DPOTrainer tokenizes the same rows (its own dataset preparation, on
many sample rows); the rows a template cannot use named by file and row; and the
CLI's check of the tokenizer before the model loads."""
from __future__ import annotations

import json

import pytest

from anita_core.assets import TOKENIZER_DIR
from anita_core.data import BadRowError, DPODataConfig, build_dpo_data, load_tokenizer, tokenize_pairs
from anita_core.data.dpo_render import check_dpo_template, split_pair, PairProblem
from anita_core.data.rows import check_dpo_row
from tests.chat_tokenizers import CHATML, INST, Unloadable, chat_model_dir, write_tokenizer
from tests.helpers import sample_rows


def _trl_tokenized(tokenizer_dir, dataset_rows, tmp_path):
    """TRL's DPOTrainer's own tokenized train dataset for ``dataset_rows``."""
    import datasets
    import transformers
    import trl
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_length=None,
                         report_to="none", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=transformers.LlamaForCausalLM(config),
                             ref_model=transformers.LlamaForCausalLM(config), args=args,
                             train_dataset=datasets.Dataset.from_list(dataset_rows),
                             processing_class=hf_tok)
    data = trainer.train_dataset
    return [(data[i]["prompt_ids"], data[i]["chosen_ids"], data[i]["rejected_ids"])
            for i in range(len(data))]


def _alternating(rows):
    """[INST] templates take user/assistant turns only (a system turn first is fine)."""
    def ok(prompt):
        turns = prompt[1:] if prompt[0]["role"] == "system" else prompt
        return all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(turns))
    return [r for r in rows if ok(r["prompt"])]


@pytest.mark.parametrize("kind", ["chatml", "inst"])
def test_chat_template_pairs_tokenize_as_trl_does(kind, tmp_path):
    folder = write_tokenizer(tmp_path / kind, kind, CHATML if kind == "chatml" else INST)
    tok = load_tokenizer(str(folder))
    rows = [check_dpo_row(r) for r in sample_rows("dpo")[:30] + sample_rows("dpo_messages")[:30]]
    rows = _alternating(rows) if kind == "inst" else rows
    # answers with spaces around them: the chat template keeps them (llama3 trims)
    rows.append({"prompt": [{"role": "user", "content": "Ciao "}], "chosen": " Ciao!\n",
                 "rejected": "No.", "source": None})
    conversational = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    expected = _trl_tokenized(folder, conversational, tmp_path)
    ours = tokenize_pairs(rows, tok, template="chat")
    assert len(rows) > 40
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ours] == expected
    if kind == "chatml":        # the completion is what follows the prompt: answer, <|im_end|>, "\n"
        assert tok.decode(ours[-1].chosen_ids) == " Ciao!\n<|im_end|>\n"


def test_none_template_is_trls_raw_text(tmp_path):
    """--template none: TRL's non-conversational rows (the tokenizer adds its BOS, EOS ends answers)."""
    tok = load_tokenizer(TOKENIZER_DIR)
    rows = [check_dpo_row(r) for r in sample_rows("dpo")[:30]]
    expected = _trl_tokenized(TOKENIZER_DIR, [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"],
                                               "rejected": r["rejected"]} for r in rows], tmp_path)
    ours = tokenize_pairs(rows, tok, template="none")
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ours] == expected
    assert ours[0].prompt_ids[0] == tok.bos_id and ours[0].chosen_ids[-1] == tok.eos_id
    # a conversation has no raw-text form
    with pytest.raises(PairProblem, match="--template none renders a prompt of one user message"):
        tokenize_pairs([check_dpo_row(sample_rows("dpo_messages")[0])], tok, template="none")


def test_split_is_the_common_prefix():
    # the prompt's last token merged with the answer's first in both full sequences
    assert split_pair([1, 2, 3], [1, 2, 9, 5], [1, 2, 3, 6]) == ([1, 2], [9, 5], [3, 6])
    with pytest.raises(PairProblem, match="empty prompt"):
        split_pair([7], [1, 2], [1, 3])
    with pytest.raises(PairProblem, match="nothing after the prompt for the rejected answer"):
        split_pair([1, 2], [1, 2, 3], [1, 2])


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


GOOD = {"prompt": "Qual è la capitale italiana?", "chosen": "Roma.", "rejected": "Milano."}


def test_rows_a_template_cannot_use_are_named(tmp_path):
    # a template that writes no assistant turn: nothing follows the prompt
    drops_answers = ("{% for m in messages %}{% if m['role'] != 'assistant' %}"
                     "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                     "{% endif %}{% endfor %}")
    # a template that writes only the answers: the prompt renders to nothing
    only_answers = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")
    path = _write(tmp_path / "pairs.jsonl", [GOOD, GOOD])
    for source, problem in ((drops_answers, "no assistant span"), (only_answers, "empty prompt")):
        tok = load_tokenizer(str(write_tokenizer(tmp_path / problem[:5], "chatml", source)))
        with pytest.raises(BadRowError, match=rf"^{path}: row 1: pair whose prompt ends "
                                              rf"'Qual è la capitale italiana\?': .*{problem}"):
            build_dpo_data(DPODataConfig(path, template="chat"), tok)
        with pytest.raises(ValueError, match=r"no usable preference pairs .* skipped \(malformed\) 2"):
            build_dpo_data(DPODataConfig(path, template="chat", skip_bad_rows=True), tok)


def test_identical_pairs_after_templating_are_named(tmp_path):
    tok = load_tokenizer(TOKENIZER_DIR)
    same = dict(GOOD, chosen="Roma.", rejected="  Roma.\n")    # llama3 trims the answers
    path = _write(tmp_path / "pairs.jsonl", [GOOD, same, GOOD])
    data = build_dpo_data(DPODataConfig(path), tok)
    assert data.stats.identical_pairs == 1 and data.stats.identical_pair_rows == [f"{path}: row 2"]
    assert data.stats.examples == 2


def test_check_names_the_template_that_works(tmp_path):
    tok = load_tokenizer(str(write_tokenizer(tmp_path / "c", "chatml", CHATML)))
    with pytest.raises(ValueError) as e:
        check_dpo_template(tok, "llama3")
    assert str(e.value) == (f"{tok.name}: no <|begin_of_text|> token, which --template llama3 needs; "
                            "use --template chat or --template none")
    for template in ("llama3", "chat", "none"):
        check_dpo_template(load_tokenizer(TOKENIZER_DIR), template)


FAST = ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--eval-split", "0",
        "--gradient-accumulation-steps", "1", "--max-length", "96", "--max-prompt-length", "64"]


def test_cli_checks_the_template_before_loading_and_trains_with_chat(tmp_path, capsys):
    import train_dpo
    ckpt = chat_model_dir(tmp_path)
    data = _write(tmp_path / "pairs.jsonl", sample_rows("dpo")[:4] + [dict(GOOD, rejected="Roma.")])
    with Unloadable(ckpt):
        code = train_dpo.main(["--model", str(ckpt), "--data", data, "--output-dir", str(tmp_path / "bad"),
                               *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert (f"error: argument --template: {ckpt / 'tokenizer.json'}: no <|begin_of_text|> token, which "
            "--template llama3 needs; use --template chat or --template none") in err
    assert "base model" not in err                                  # the model was never loaded
    code = train_dpo.main(["--model", str(ckpt), "--data", data, "--template", "chat",
                           "--output-dir", str(tmp_path / "run"), *FAST])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (f"warning: 1 preference pair(s) whose chosen and rejected answers are the same after "
            f"templating were skipped (they carry no preference signal): {data}: row 5") in err


def test_none_template_refuses_a_system_prompt(capsys):
    import train_dpo
    with pytest.raises(SystemExit) as e:
        train_dpo.main(["--template", "none", "--system-prompt", "Sii breve."])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[0] == (
        "train_dpo.py: error: argument --system-prompt: not allowed with --template none (raw text "
        "has no system turn)")
