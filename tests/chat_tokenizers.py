"""Small tokenizers that are not LLaMA-3's, built here with the `tokenizers` library
(no download): a byte-level BPE one with SmolLM2's ChatML layout, and a
SentencePiece-style (Metaspace) one with a Mistral-style [INST] chat template,
each in a folder with tokenizer.json + tokenizer_config.json as transformers
reads it. Trained on the bundled sample rows, vocab 400."""
from __future__ import annotations

import json

from tests.helpers import sample_rows

# SmolLM2's ChatML layout (a public format): a default system turn when the
# conversation has none, "<|im_start|>{role}\n{content}<|im_end|>\n" per turn.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same template with the answers marked for transformers' assistant masks.
CHATML_MARKED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                 "{{ '\n' }}{% else %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral-style: BOS once, "[INST] {user} [/INST]" and the answer right after,
# closed by EOS; a system turn is prepended to the first user turn; roles must alternate.
INST = ("{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% set ns.system = message['content'] + '\n\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
INST_MARKED = INST.replace("{% else %}{{ message['content'] + eos_token }}",
                           "{% else %}{% generation %}{{ message['content'] + eos_token }}"
                           "{% endgeneration %}")


def _corpus():
    for row in sample_rows("chat"):
        for m in row["messages"]:
            yield m["role"]
            yield m["content"]
    for row in sample_rows("instruction"):
        yield from (row["instruction"], row["input"], row["output"])


def write_tokenizer(folder, kind, chat_template):
    """A small trained tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "chatml":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    else:
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = []
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=4096)
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def chat_model_dir(tmp_path, kind: str = "chatml"):
    """A tiny random Llama whose folder holds the ChatML (or [INST]) tokenizer."""
    import shutil

    from anita_core.data import load_tokenizer
    from tests.model_factory import make_tiny_llama_dir
    tok_dir = write_tokenizer(tmp_path / f"tok-{kind}", kind, CHATML if kind == "chatml" else INST)
    size = load_tokenizer(str(tok_dir)).vocab_size
    ckpt = make_tiny_llama_dir(tmp_path, vocab_size=size, name=f"{kind}-llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, ckpt / name)
    return ckpt


class Unloadable:
    """``with Unloadable(ckpt):`` the checkpoint's weights are NaN inside the block, its
    safetensors header intact (the commands check headers before anything else, and
    loading would fail on the first tensor: a command that errors before loading shows
    it never loaded), restored after."""

    def __init__(self, ckpt):
        self.path = ckpt / "model.safetensors"

    def __enter__(self):
        self.weights = self.path.read_bytes()
        start = 8 + int.from_bytes(self.weights[:8], "little")
        self.path.write_bytes(self.weights[:start] + b"\xff" * (len(self.weights) - start))
        return self

    def __exit__(self, *exc):
        self.path.write_bytes(self.weights)
