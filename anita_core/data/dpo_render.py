"""A preference pair rendered and tokenized the way TRL 1.16's DPOTrainer does it,
for each of train_dpo.py's --template values.

Every template yields three strings: the prompt (with the generation prompt: the
assistant header, ChatML's "<|im_start|>assistant\\n", ...), prompt + chosen and
prompt + rejected. Each is tokenized whole; the completion starts where the
prompt's ids and each full sequence's ids stop agreeing (TRL's
``common_prefix_length``, the shorter of the two), so a template that renders
the prompt alone differently from the prompt followed by an answer, or a
tokenizer that merges tokens across the boundary (SentencePiece's "[/INST]Ok"),
gets exactly TRL's split:

    prompt_ids   = ids(prompt)[:n],   n = min(common prefix with each full sequence)
    chosen_ids   = ids(prompt + chosen)[n:],   rejected_ids likewise.

Templates:
- llama3: LLaMA-3's chat format written out (templates.llama3_chat_segments):
  BOS, headers, contents trimmed, <|eot_id|> after each turn;
- chat: the tokenizer's own chat_template (chat_template.py), the prompt
  rendered with add_generation_prompt=True and each full conversation without,
  the answer as written (TRL's apply_chat_template on conversational rows);
- none: raw text, TRL's non-conversational rows: the prompt's text, each answer
  followed by the tokenizer's EOS (unless it already ends with it), encoded
  with the tokenizer's post-processor as transformers' ``tokenizer(text)`` does
  (so a BOS where the tokenizer adds one, as LLaMA-3's does). Only single-turn
  prompts without a system message have a raw-text form.

A pair that cannot be rendered (the template fails, writes no answer, or leaves
no prompt token) is a ``PairProblem`` naming what went wrong; the caller names
the file and row.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from anita_core.data import templates
from anita_core.data.chat_template import ChatTemplateError, render as render_chat

DPO_TEMPLATES = ("llama3", "chat", "none")


class PairProblem(ValueError):
    """A preference row this template cannot turn into a (prompt, chosen, rejected) triple."""


def check_dpo_template(tokenizer, template: str) -> None:
    """A one-line ValueError naming the tokenizer file, what it lacks and the
    --template that would work with it, when ``template`` cannot render with it."""
    if template not in DPO_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {DPO_TEMPLATES}")
    has_llama3 = all(tokenizer.has_token(t) for t in templates.LLAMA3_TOKENS)
    usable = {"llama3": has_llama3, "chat": bool(tokenizer.chat_template),
              "none": tokenizer.eos_token is not None}
    if usable[template]:
        return
    others = [t for t in DPO_TEMPLATES if usable[t] and t != template]
    hint = ("use " + " or ".join(f"--template {t}" for t in others) if others else
            "no --template works with it (give it a chat_template or LLaMA-3's special tokens)")
    if template == "llama3":
        missing = next(t for t in templates.LLAMA3_TOKENS if not tokenizer.has_token(t))
        raise ValueError(f"{tokenizer.name}: no {missing} token, which --template llama3 "
                         f"needs; {hint}")
    if template == "chat":
        raise ValueError(f"{tokenizer.config_name}: no chat_template, which --template chat "
                         f"needs; {hint}")
    raise ValueError(f"{tokenizer.config_name}: no eos_token, which --template none ends "
                     f"answers with; {hint}")


def pair_texts(row: Dict, template: str, tokenizer,
               system_prompt: Optional[str] = None) -> Tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) for a validated row
    (rows.check_dpo_row: prompt messages, chosen and rejected answer strings)."""
    prompt = templates.with_system_prompt(row["prompt"], system_prompt)
    if template == "none":
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            raise PairProblem(f"--template none renders a prompt of one user message; this one has "
                              f"{len(prompt)} message(s) ({', '.join(m['role'] for m in prompt)}); "
                              "use --template chat or llama3")
        text = prompt[0]["content"]
        eos = tokenizer.eos_token
        return (text, *(text + a + ("" if a.endswith(eos) else eos)
                        for a in (row["chosen"], row["rejected"])))
    conversations = [prompt + [{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected")]
    if template == "llama3":
        def render_llama3(messages, generation_prompt=False):
            return templates.render(templates.llama3_chat_segments(
                messages, add_generation_prompt=generation_prompt))
        return (render_llama3(prompt, True), *(render_llama3(c) for c in conversations))
    if template != "chat":
        raise ValueError(f"unknown template {template!r}; expected one of {DPO_TEMPLATES}")
    source, specials = tokenizer.chat_template, tokenizer.special_tokens
    try:
        head = render_chat(source, prompt, specials, add_generation_prompt=True)[0]
        return (head, *(render_chat(source, c, specials)[0] for c in conversations))
    except ChatTemplateError as e:
        raise PairProblem(str(e)) from None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_pair(prompt_ids: List[int], chosen_full: List[int], rejected_full: List[int],
               ) -> Tuple[List[int], List[int], List[int]]:
    """(prompt, chosen, rejected) ids by the common-prefix rule of the module docstring;
    PairProblem when no prompt token or no answer token is left."""
    n = min(common_prefix_length(prompt_ids, chosen_full),
            common_prefix_length(prompt_ids, rejected_full))
    chosen, rejected = chosen_full[n:], rejected_full[n:]
    if n == 0:
        raise PairProblem("the prompt renders to no token that the answers share (empty prompt "
                          "after templating)")
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise PairProblem(f"the template writes nothing after the prompt for the {name} answer "
                              "(no assistant span)")
    return prompt_ids[:n], chosen, rejected


def encode_pairs(rows: Sequence[Dict], tokenizer, template: str = "llama3",
                 system_prompt: Optional[str] = None,
                 ) -> List[Tuple[List[int], List[int], List[int]] | PairProblem]:
    """Per row: its (prompt, chosen, rejected) ids, or the PairProblem that stops it.
    One batched tokenizer call for all rows; only ``none`` lets the tokenizer's
    post-processor add special tokens (the other templates write them all)."""
    texts, outcomes = [], []
    for row in rows:
        try:
            texts.extend(pair_texts(row, template, tokenizer, system_prompt))
            outcomes.append(None)
        except PairProblem as problem:
            outcomes.append(problem)
    ids = tokenizer.encode_batch(texts, add_special_tokens=template == "none")
    out, at = [], 0
    for outcome in outcomes:
        if outcome is not None:
            out.append(outcome)
            continue
        try:
            out.append(split_pair(*ids[at:at + 3]))
        except PairProblem as problem:
            out.append(problem)
        at += 3
    return out

