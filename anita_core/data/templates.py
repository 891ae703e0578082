"""Prompt templates: every row shape is rendered into a list of Segments, each a
piece of text that is either context (prompt) or answer.

Rendering into segments rather than one string keeps the label mask exact: each
segment is tokenized on its own and the answer tokens are known without
searching for where the answer starts. The segment boundaries sit where the
LLaMA-3 pre-tokenizer splits anyway (before/after a special token, after the
"\\n\\n" that ends a header, after "### Response:\\n"), so the concatenated token
ids equal the tokenization of the whole rendered string (tests check this
against transformers' apply_chat_template on the shipped tokenizer_config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"

ROLES = ("system", "user", "assistant")

# The Stanford Alpaca preambles (a public prompt format), used when a row has
# no system text of its own.
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.")

# llama3: LLaMA-3's chat format, written out; alpaca: the Alpaca prompt; chat:
# the tokenizer's own chat_template (tokenizer_config.json), rendered as
# transformers does (chat_template.py).
TEMPLATES = ("llama3", "alpaca", "chat")
LLAMA3_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)

# LLaMA-3's chat template semantics, written out for transformers: BOS once, then
# per message "<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>",
# and the assistant header when a generation prompt is asked for.
LLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Segment:
    text: str
    is_answer: bool   # answer text: the model learns to produce these tokens


def render(segments: Sequence[Segment]) -> str:
    """The full rendered string of a list of segments."""
    return "".join(s.text for s in segments)


def llama3_header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def llama3_chat_segments(messages: Sequence[Dict[str, str]], *,
                         add_generation_prompt: bool = False) -> List[Segment]:
    """LLaMA-3 chat rendering. Assistant contents and their <|eot_id|> are answer
    segments (every assistant turn is trained on, as TRL's assistant-only loss
    does); headers, system and user turns are context. Contents are stripped,
    exactly like the template's ``| trim``."""
    segments = [Segment(BEGIN_OF_TEXT, False)]
    for message in messages:
        is_answer = message["role"] == "assistant"
        segments.append(Segment(llama3_header(message["role"]), False))
        segments.append(Segment(message["content"].strip() + EOT, is_answer))
    if add_generation_prompt:
        segments.append(Segment(llama3_header("assistant"), False))
    return _merge_adjacent(segments)


def with_system_prompt(messages: Sequence[Dict[str, str]],
                       system_prompt: Optional[str]) -> List[Dict[str, str]]:
    """Prepends a system message when a default is given and the conversation has none."""
    messages = list(messages)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def instruction_messages(system: str, instruction: str, input_text: str, output: str,
                         system_prompt: Optional[str] = None) -> List[Dict[str, str]]:
    """An instruction row as a chat: [system], user = instruction (+ blank line +
    input when there is one), assistant = output. The row's own system text wins
    over the default ``system_prompt``."""
    system = system.strip() or (system_prompt or "").strip()
    user = instruction.strip()
    if input_text.strip():
        user = f"{user}\n\n{input_text.strip()}"
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def alpaca_prompt(system: str, instruction: str, input_text: str,
                  system_prompt: Optional[str] = None) -> str:
    """The Alpaca prompt (without BOS), ending with "### Response:\\n". The row's
    system text, else the default system prompt, else the Alpaca preamble."""
    input_text = input_text.strip()
    preamble = system.strip() or (system_prompt or "").strip() or (
        ALPACA_PREAMBLE_WITH_INPUT if input_text else ALPACA_PREAMBLE_NO_INPUT)
    text = f"{preamble}\n\n### Instruction:\n{instruction.strip()}\n\n"
    if input_text:
        text += f"### Input:\n{input_text}\n\n"
    return text + "### Response:\n"


def alpaca_segments(system: str, instruction: str, input_text: str, output: str,
                    system_prompt: Optional[str] = None, *, bos: str = BEGIN_OF_TEXT,
                    eos: str = EOT) -> List[Segment]:
    """``bos`` + prompt, then the answer and ``eos``: LLaMA-3's <|begin_of_text|>
    and <|eot_id|> by default (see ``instruction_markers``)."""
    return [Segment(bos + alpaca_prompt(system, instruction, input_text, system_prompt), False),
            Segment(output.strip() + eos, True)]


def instruction_segments(row: Dict[str, str], template: str,
                         system_prompt: Optional[str] = None, *, bos: str = BEGIN_OF_TEXT,
                         eos: str = EOT) -> List[Segment]:
    """An instruction row {system, instruction, input, output} with ``template``
    ("llama3" or "alpaca"; ``bos``/``eos`` are alpaca's markers)."""
    if template == "alpaca":
        return alpaca_segments(row["system"], row["instruction"], row["input"], row["output"],
                               system_prompt, bos=bos, eos=eos)
    if template == "llama3":
        return llama3_chat_segments(instruction_messages(
            row["system"], row["instruction"], row["input"], row["output"], system_prompt))
    raise ValueError(f"unknown template {template!r}; expected 'llama3' or 'alpaca'")


def chat_segments(messages: Sequence[Dict[str, str]],
                  system_prompt: Optional[str] = None) -> List[Segment]:
    return llama3_chat_segments(with_system_prompt(messages, system_prompt))


def raw_text_segments(text: str, *, bos: Optional[str] = BEGIN_OF_TEXT,
                      eos: str = EOT) -> List[Segment]:
    """Language-adaptation text: ``{bos}{text}{eos}`` with the tokenizer's own
    BOS (none when it has none) and EOS, all of it answer (the text is not
    stripped: raw text is taken as written). LLaMA-3's tokenizer config gives
    ``<|begin_of_text|>{text}<|eot_id|>``."""
    return ([Segment(bos, False)] if bos else []) + [Segment(text + eos, True)]


def instruction_markers(tokenizer) -> Tuple[str, str]:
    """(BOS, end of answer) for the alpaca template: LLaMA-3's <|begin_of_text|>
    and <|eot_id|> when the tokenizer has them (the format as it always was),
    else the tokenizer's own bos_token (or nothing) and eos_token."""
    if tokenizer.has_token(BEGIN_OF_TEXT) and tokenizer.has_token(EOT):
        return BEGIN_OF_TEXT, EOT
    return tokenizer.bos_token or "", tokenizer.eos_token


def spans_to_segments(text: str, spans: Sequence[Tuple[int, int]]) -> List[Segment]:
    """``text`` cut into context and answer segments at the (sorted, disjoint) answer spans."""
    segments, at = [], 0
    for start, end in spans:
        if start > at:
            segments.append(Segment(text[at:start], False))
        segments.append(Segment(text[start:end], True))
        at = end
    if at < len(text):
        segments.append(Segment(text[at:], False))
    return segments


def tokenizer_chat_segments(tokenizer, messages: Sequence[Dict[str, str]],
                            system_prompt: Optional[str] = None, *,
                            need_answers: bool = True) -> List[Segment]:
    """A conversation rendered with the tokenizer's own chat template; assistant
    answers are answer segments (chat_template.answer_spans). Raises
    ChatTemplateError when answers are needed and the template marks none."""
    from anita_core.data.chat_template import ChatTemplateError, answer_spans, render as render_chat
    messages = with_system_prompt(messages, system_prompt)
    if not need_answers:
        text, _ = render_chat(tokenizer.chat_template, messages, tokenizer.special_tokens)
        return [Segment(text, False)]
    text, spans = answer_spans(tokenizer.chat_template, messages, tokenizer.special_tokens)
    if not spans:
        raise ChatTemplateError("the chat template produced no assistant span (nothing to learn "
                                "with answer-only loss); use --train-on-all-tokens or another "
                                "--template")
    return spans_to_segments(text, spans)


def check_template(tokenizer, template: str, shape: str = "auto") -> None:
    """A one-line ValueError naming the tokenizer file, what is missing and
    which --template would work, when ``tokenizer`` cannot render ``shape``
    rows ("auto": instruction or chat rows) with ``template``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    has_llama3 = all(tokenizer.has_token(t) for t in LLAMA3_TOKENS)
    working = [t for t, ok in (("llama3", has_llama3), ("chat", bool(tokenizer.chat_template)),
                               ("alpaca", has_llama3 or tokenizer.eos_token is not None)) if ok]

    def alternative(exclude: str) -> str:
        others = [t for t in working if t != exclude]
        if not others:
            return "no --template works with it (give it a chat_template or LLaMA-3's special tokens)"
        return "use " + " or ".join(f"--template {t}" for t in others)

    if shape == "text":
        if tokenizer.eos_token is None:
            raise ValueError(f"{tokenizer.config_name}: no eos_token, which raw text rows end "
                             "with; set eos_token in tokenizer_config.json")
        return
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError(f"{tokenizer.config_name}: no chat_template, which --template chat "
                             f"needs; {alternative('chat')}")
        return
    # llama3 renders instruction and chat rows; alpaca renders chat rows as llama3 does
    needs_llama3 = template == "llama3" or shape == "chat"
    if needs_llama3 and not has_llama3:
        missing = next(t for t in LLAMA3_TOKENS if not tokenizer.has_token(t))
        what = "--template llama3" if template == "llama3" else "chat rows under --template alpaca"
        raise ValueError(f"{tokenizer.name}: no {missing} token, which {what} needs; "
                         f"{alternative(template if template == 'llama3' else 'alpaca')}")
    if template == "alpaca" and not has_llama3 and tokenizer.eos_token is None:
        raise ValueError(f"{tokenizer.config_name}: no eos_token, which --template alpaca ends "
                         f"answers with; {alternative('alpaca')}")


def _merge_adjacent(segments: List[Segment]) -> List[Segment]:
    """Joins neighbouring segments of the same kind (fewer, longer pieces to tokenize)."""
    merged: List[Segment] = []
    for s in segments:
        if merged and merged[-1].is_answer == s.is_answer:
            merged[-1] = Segment(merged[-1].text + s.text, s.is_answer)
        else:
            merged.append(s)
    return merged
