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
from typing import Dict, List, Optional, Sequence

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

TEMPLATES = ("llama3", "alpaca")

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
                    system_prompt: Optional[str] = None) -> List[Segment]:
    return [Segment(BEGIN_OF_TEXT + alpaca_prompt(system, instruction, input_text, system_prompt),
                    False),
            Segment(output.strip() + EOT, True)]


def instruction_segments(row: Dict[str, str], template: str,
                         system_prompt: Optional[str] = None) -> List[Segment]:
    """An instruction row {system, instruction, input, output} with ``template``
    ("llama3" or "alpaca")."""
    if template == "alpaca":
        return alpaca_segments(row["system"], row["instruction"], row["input"], row["output"],
                               system_prompt)
    if template == "llama3":
        return llama3_chat_segments(instruction_messages(
            row["system"], row["instruction"], row["input"], row["output"], system_prompt))
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def chat_segments(messages: Sequence[Dict[str, str]],
                  system_prompt: Optional[str] = None) -> List[Segment]:
    return llama3_chat_segments(with_system_prompt(messages, system_prompt))


def raw_text_segments(text: str) -> List[Segment]:
    """Language-adaptation text: ``<|begin_of_text|>{text}<|eot_id|>``, all of it
    answer (the text is not stripped: raw text is taken as written)."""
    return [Segment(BEGIN_OF_TEXT, False), Segment(text + EOT, True)]


def _merge_adjacent(segments: List[Segment]) -> List[Segment]:
    """Joins neighbouring segments of the same kind (fewer, longer pieces to tokenize)."""
    merged: List[Segment] = []
    for s in segments:
        if merged and merged[-1].is_answer == s.is_answer:
            merged[-1] = Segment(merged[-1].text + s.text, s.is_answer)
        else:
            merged.append(s)
    return merged
