"""A fuzzer over everything a user hands anita: hypothesis generates hostile inputs of
each kind, runs them through the reader or check that meets them first (and the CLI,
where a refusal is cheap), and asserts a clean accept or one line naming the file
(and the row or field): never another exception, never a traceback.

Derandomized (the same cases every run of this file: a CI failure reproduces), no example
database, each example under a stated deadline; ANITA_FUZZ_SCALE=N tries N times as many
from fresh seeds (a search for new failures, not for CI). Cases a CI run tries
(max_examples):

    class                                                          cases
    JSON-lines files through the SFT and DPO data stages (read,     1000
      check, render with each template, tokenize; streamed when
      --max-samples is drawn): mutated rows, wrong types, huge
      numbers, deep nesting, lone surrogates, BOMs, random and
      flipped bytes, blank lines
    a data file of every format (.jsonl .json .csv .parquet          600
      .jsonl.gz): random bytes, cut or flipped valid files, CSV
      text with quotes, NULs and ragged rows
    config.json of the model folder: fields deleted or given any     400
      JSON value, 4,000-6,000-digit numbers, quantization and rope
      objects, random and flipped bytes
    tokenizer.json (cut, flipped, fields replaced) and               300
      tokenizer_config.json (special tokens and chat_template of
      every type, flipped bytes)
    chat templates: loops, range(), filters, *, +, **, recursive     400
      macros, errors, surrogates, bad syntax (under the bounds)
    adapter folders: adapter_config.json fields, its bytes,          300
      safetensors flipped, cut or reshaped, a file gone
    checkpoints: trainer_state.json fields (step, position,           200
      manifest mark, optimizer, the whole file), manifests kept,
      removed or rewritten
    flags of train_sft.py, train_dpo.py and chat.py: odd values      600
      (negative numbers in every notation, 5,000 digits, nan, inf,
      unicode digits, control characters, undecodable bytes, "--")
    train_sft.py end to end on fuzzed data (a base model whose       100
      weights cannot load: a data refusal, or the model's line)
    --output-dir under a file, or a name too long                     (2)
                                                           total    3900
About 20 s on the project's 2-core machine.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch

# hypothesis is in the test extra: without it this file fails to import (never a silent skip)
import hypothesis  # noqa: E402,F401
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

# hypothesis keeps a cache in ./.hypothesis: not in the checkout (tests write nothing there)
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "anita-hypothesis"))

import chat  # noqa: E402
import train_dpo  # noqa: E402
import train_sft  # noqa: E402
from anita_core.assets import TOKENIZER_DIR  # noqa: E402
from anita_core.data import BadRowError, DataStats, load_tokenizer  # noqa: E402
from anita_core.data import chat_template  # noqa: E402
from anita_core.data.chat_template import ChatTemplateError, render  # noqa: E402
from anita_core.data.dpo import DPODataConfig, build_dpo_data  # noqa: E402
from anita_core.data.loading import read_rows  # noqa: E402
from anita_core.data.pipeline import build_sft_data  # noqa: E402
from anita_core.data.sft import SFTDataConfig  # noqa: E402
from anita_core.lora import LoRAAdapters, LoRAConfig, save_peft  # noqa: E402
from anita_core.model.config import ModelConfig  # noqa: E402
from anita_core.cli.common import BUNDLED_MODEL  # noqa: E402
from anita_core.recipes.cli_train import parse_command_line  # noqa: E402
from anita_core.train.input_checks import BadInput, check_adapter, check_model  # noqa: E402
from anita_core.train.run_checkpoint import (checkpoint_damage, load_checkpoint_state,  # noqa: E402
                                             position_problem, save_checkpoint)

FUZZ = settings(derandomize=True, database=None, deadline=timedelta(seconds=5), print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
# ANITA_FUZZ_SCALE=N: N times the cases, from fresh random seeds (a search, not CI)
SCALE = int(os.environ.get("ANITA_FUZZ_SCALE", "1"))


def cases(n: int, **overrides) -> settings:
    return settings(FUZZ, max_examples=n * SCALE, derandomize=SCALE == 1, **overrides)
TOKENIZER = load_tokenizer(TOKENIZER_DIR)
MODEL_CONFIG = ModelConfig.from_json(BUNDLED_MODEL)
BASE_CONFIG = json.loads((Path(BUNDLED_MODEL) / "config.json").read_text())


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="anita-fuzz-") as folder:
        yield Path(folder)


def one_line(message: str) -> str:
    message = message.strip()
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------------- values
LONE_SURROGATES = st.sampled_from(["\\ud800", "\\udbff", "\\udc00", "\\uDFFF", "\\ud83d"])
HUGE_NUMBERS = st.integers(4000, 6000).map(lambda n: "9" * n)
ODD_NUMBERS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "1E-400", "0.0"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=12)
ROWS = [{"instruction": "Dimmi un colore.", "input": "", "output": "Blu."},
        {"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Salve!"}]},
        {"text": "Il mare è calmo."},
        {"prompt": "Capitale?", "chosen": "Roma.", "rejected": "Milano."}]


def _mutated_row(draw) -> bytes:
    row = json.loads(json.dumps(draw(st.sampled_from(ROWS))))
    keys = list(row)
    action = draw(st.sampled_from(["value", "drop", "add", "nested_value"]))
    if action == "value":
        row[draw(st.sampled_from(keys))] = draw(json_values)
    elif action == "drop":
        row.pop(draw(st.sampled_from(keys)))
    elif action == "add":
        row[draw(st.text(max_size=10))] = draw(json_values)
    elif "messages" in row:
        row["messages"][draw(st.integers(0, 1))][draw(st.sampled_from(["role", "content", "x"]))] = \
            draw(json_values)
    return json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def _spliced_row(draw) -> bytes:
    """A valid row whose text holds something hostile, as raw JSON text."""
    hostile = draw(st.one_of(LONE_SURROGATES, HUGE_NUMBERS, ODD_NUMBERS,
                             st.integers(50, 3000).map(lambda n: "[" * n + "]" * n),
                             st.integers(50, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)))
    template = draw(st.sampled_from(['{{"text": "{h}"}}', '{{"text": "a", "x": {h}}}',
                                     '{{"instruction": "{h}", "output": "b"}}', "{h}"]))
    return template.format(h=hostile).encode()


def _flipped(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "delete", "insert"]))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "delete":
            del data[at]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


@st.composite
def jsonl_files(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["good", "mutated", "spliced", "bytes", "flipped", "blank"]))
        if kind == "good":
            lines.append(json.dumps(draw(st.sampled_from(ROWS))).encode())
        elif kind == "mutated":
            lines.append(_mutated_row(draw))
        elif kind == "spliced":
            lines.append(_spliced_row(draw))
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=60)).replace(b"\n", b" "))
        elif kind == "flipped":
            lines.append(_flipped(draw, json.dumps(draw(st.sampled_from(ROWS))).encode()).replace(b"\n", b""))
        else:
            lines.append(b"   ")
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b"", b"\r\n"]))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"])) + data


def check_refusal(message: str, path: Path) -> None:
    """A refusal of a data file: one line, naming the file (and, for a row, its number)."""
    message = one_line(message)
    assert message.startswith(str(path)), message


@cases(1000)
@given(data=jsonl_files(), skip=st.booleans(), stage=st.sampled_from(["sft", "dpo"]),
       template=st.sampled_from(["llama3", "chat", "alpaca", "none"]),
       max_samples=st.sampled_from([None, 1, 3]))
def test_fuzzed_json_lines_are_read_or_refused_by_file_and_row(data, skip, stage, template, max_samples):
    """Through the data stage of either trainer (read, check, render, tokenize; --max-samples
    draws by streaming): examples, or one line naming the file and the row."""
    with scratch() as folder:
        path = folder / "data.jsonl"
        path.write_bytes(data)
        if stage == "sft":
            build = build_sft_data
            config = SFTDataConfig(data=[str(path)], template=template if template != "none" else "llama3",
                                   max_seq_length=64, skip_bad_rows=skip, max_samples=max_samples)
        else:
            build = build_dpo_data
            config = DPODataConfig(data=[str(path)], template=template if template != "alpaca" else "none",
                                   max_length=64, skip_bad_rows=skip, max_samples=max_samples)
        try:
            build(config, TOKENIZER)
            event("accepted")
        except BadRowError as e:
            check_refusal(str(e), path)
            assert f": row {e.row_number}: " in str(e)
            event("refused: a row")
        except (ValueError, FileNotFoundError) as e:      # the whole file: empty, no known shape...
            check_refusal(str(e), path)
            event("refused: the file")


DATA_SUFFIXES = [".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz"]


def _valid_file(suffix: str) -> bytes:
    rows = [{"text": "uno"}, {"text": "due"}]
    if suffix == ".csv":
        return b'text\nuno\n"due, tre"\n'
    if suffix == ".json":
        return json.dumps(rows).encode()
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq
        sink = io.BytesIO()
        pq.write_table(pyarrow.Table.from_pylist(rows), sink)
        return sink.getvalue()
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data


VALID_FILES = {suffix: _valid_file(suffix) for suffix in DATA_SUFFIXES}


@st.composite
def data_files(draw):
    suffix = draw(st.sampled_from(DATA_SUFFIXES))
    kind = draw(st.sampled_from(["random", "flipped", "cut", "csv text"]))
    if kind == "random":
        data = draw(st.binary(max_size=400))
    elif kind == "flipped":
        data = _flipped(draw, VALID_FILES[suffix])
    elif kind == "cut":
        valid = VALID_FILES[suffix]
        data = valid[:draw(st.integers(0, len(valid)))]
    else:
        cells = st.text(alphabet=st.sampled_from('ab,"\n\r\x00 é'), max_size=12)
        data = "\n".join(",".join(draw(st.lists(cells, min_size=1, max_size=4)))
                         for _ in range(draw(st.integers(1, 4)))).encode()
    return suffix, data


@cases(600)
@given(case=data_files(), skip=st.booleans())
def test_a_data_file_of_any_format_is_read_or_refused_naming_it(case, skip):
    suffix, data = case
    with scratch() as folder:
        path = folder / f"data{suffix}"
        path.write_bytes(data)
        try:
            read_rows(str(path), stats=DataStats(), skip_bad_rows=skip)
            event("accepted")
        except (ValueError, FileNotFoundError) as e:
            check_refusal(str(e), path)
            event("refused")


# ---------------------------------------------------------------------- the model folder
def model_folder(folder: Path) -> Path:
    """The bundled model's files, linked (only the file a case damages is rewritten)."""
    model = folder / "model"
    model.mkdir()
    for name in os.listdir(BUNDLED_MODEL):
        (model / name).symlink_to(Path(BUNDLED_MODEL) / name)
    return model


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def check_model_refusal(message: str, model: Path) -> None:
    message = one_line(message)
    assert message.startswith(f"--model {model}: ") or message.startswith("--tokenizer "), message


@st.composite
def configs(draw) -> bytes:
    config = json.loads(json.dumps(BASE_CONFIG))
    kind = draw(st.sampled_from(["value", "drop", "quantization", "rope", "bytes", "flipped"]))
    if kind == "value":        # "__HUGE__": a number of 4,000-6,000 digits, spliced into the text
        config[draw(st.sampled_from(sorted(config)))] = draw(json_values | st.just("__HUGE__"))
    elif kind == "drop":
        config.pop(draw(st.sampled_from(sorted(config))))
    elif kind == "quantization":
        config["quantization_config"] = draw(json_values | st.fixed_dictionaries(
            {"load_in_4bit": st.booleans(), "bnb_4bit_quant_type": st.sampled_from(["nf4", "fp4", 3]),
             "llm_int8_skip_modules": json_values}))
    elif kind == "rope":
        config["rope_scaling"] = draw(json_values | st.fixed_dictionaries(
            {"rope_type": st.sampled_from(["llama3", "default", "yarn"]), "factor": json_values,
             "low_freq_factor": json_values, "high_freq_factor": json_values,
             "original_max_position_embeddings": json_values}))
    text = json.dumps(config).replace('"__HUGE__"', draw(HUGE_NUMBERS)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "flipped":
        return _flipped(draw, text)
    return text


@cases(400)
@given(config=configs())
def test_a_damaged_config_is_accepted_or_one_line_naming_it(config):
    with scratch() as folder:
        model = model_folder(folder)
        replace_file(model / "config.json", config)
        try:
            check_model(str(model))
            event("accepted")
        except BadInput as e:
            check_model_refusal(str(e), model)
            event("refused")


TOKENIZER_JSON = (Path(TOKENIZER_DIR) / "tokenizer.json").read_bytes()
TOKENIZER_CONFIG = json.loads((Path(TOKENIZER_DIR) / "tokenizer_config.json").read_text())


@st.composite
def tokenizer_files(draw):
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["cut", "flipped", "value"]))
        if kind == "cut":
            return "tokenizer.json", TOKENIZER_JSON[:draw(st.integers(0, len(TOKENIZER_JSON)))]
        if kind == "flipped":
            return "tokenizer.json", _flipped(draw, TOKENIZER_JSON)
        parsed = json.loads(TOKENIZER_JSON)
        parsed[draw(st.sampled_from(sorted(parsed)))] = draw(json_values)
        return "tokenizer.json", json.dumps(parsed).encode()
    config = json.loads(json.dumps(TOKENIZER_CONFIG))
    field = draw(st.sampled_from(["bos_token", "eos_token", "pad_token", "chat_template", "added_tokens_decoder"]))
    config[field] = draw(json_values | st.lists(st.fixed_dictionaries({"name": json_values,
                                                                       "template": json_values})))
    data = json.dumps(config).encode()
    if draw(st.booleans()):
        data = _flipped(draw, data)
    return "tokenizer_config.json", data


@cases(300)
@given(case=tokenizer_files())
def test_a_damaged_tokenizer_is_accepted_or_one_line_naming_it(case):
    name, data = case
    with scratch() as folder:
        model = model_folder(folder)
        replace_file(model / name, data)
        try:
            checked = check_model(str(model))
        except BadInput as e:
            check_model_refusal(str(e), model)
            assert name in str(e), str(e)
            event("refused")
            return
        event("accepted")
        try:        # what loads encodes text, or says why in one line
            checked.tokenizer.encode_batch(["Ciao, come stai?", "<|begin_of_text|>x"])
        except ValueError as e:
            one_line(str(e))


# ---------------------------------------------------------------------- chat templates
SNIPPETS = st.sampled_from([
    "{{ messages[0].content }}", "{{ messages[0]['role']|upper }}", "{{ bos_token }}",
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "{% for i in range(N) %}x{% endfor %}", "{% for i in range(N) %}{% for j in range(N) %}{% endfor %}{% endfor %}",
    "{{ 'ab' * N }}", "{{ N ** N }}", "{{ 'x'|center(N) }}", "{{ messages|tojson }}",
    "{{ raise_exception('no') }}", "{{ 1 / 0 }}", "{{ messages + 1 }}", "{{ '\\ud800' }}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}", "{{ messages[99].content }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(N) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% if add_generation_prompt %}<|assistant|>{% endif %}", "{{ ''.__class__ }}",
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}", "{{ strftime_now('%Y') }}",
    "{% for", "{{ }}", "{% endfor %}", "{{ messages[0].content[::-1] }}",
])


@st.composite
def templates(draw) -> str:
    parts = draw(st.lists(SNIPPETS, min_size=1, max_size=4))
    n = draw(st.sampled_from(["3", "40", "100000", "10**9", "-1"]))
    return "".join(p.replace("N", n) for p in parts)


@cases(400)
@given(source=templates(), generation_prompt=st.booleans())
def test_a_chat_template_renders_or_fails_in_anitas_words(source, generation_prompt, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 1.0)
    messages = [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Salve"}]
    try:
        text, _ = render(source, messages, {"bos_token": "<s>"}, add_generation_prompt=generation_prompt)
    except ChatTemplateError as e:
        assert str(e).startswith("the chat template "), str(e)
        event("refused")
        return
    event("rendered")
    assert isinstance(text, str) and len(text) <= chat_template.MAX_RENDER_CHARS


# ---------------------------------------------------------------------- adapter folders
ADAPTER_BYTES = {}


def adapter_folder(folder: Path) -> Path:
    if not ADAPTER_BYTES:
        made = save_peft(LoRAAdapters.init(LoRAConfig(r=2, alpha=4, seed=0), MODEL_CONFIG),
                         folder / "first")
        ADAPTER_BYTES.update({p.name: p.read_bytes() for p in made.iterdir()})
    adapter = folder / "adapter"
    adapter.mkdir()
    for name, data in ADAPTER_BYTES.items():
        (adapter / name).write_bytes(data)
    return adapter


@st.composite
def adapter_damage(draw):
    kind = draw(st.sampled_from(["config value", "config bytes", "weights flipped", "weights cut",
                                 "weights reshaped", "file gone"]))
    if kind == "config value":
        field = draw(st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules",
                                      "layers_to_transform", "peft_type", "use_rslora", "bias",
                                      "use_dora", "init_lora_weights", "layers_pattern"]))
        return kind, (field, draw(json_values | st.just(".*")))
    if kind == "config bytes":
        return kind, draw(st.binary(max_size=100))
    if kind == "weights reshaped":
        return kind, (draw(st.integers(1, 5)), draw(st.sampled_from([torch.float32, torch.int32,
                                                                      torch.float16])))
    return kind, draw(st.integers(0, 10_000))


@cases(300)
@given(case=adapter_damage())
def test_a_damaged_adapter_folder_is_one_line_naming_it(case):
    from safetensors.torch import load_file, save_file
    kind, detail = case
    with scratch() as folder:
        adapter = adapter_folder(folder)
        config_path, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
        (adapter / "manifest.json").unlink(missing_ok=True)          # as PEFT writes it: by structure
        if kind == "config value":
            config = json.loads(config_path.read_text())
            config[detail[0]] = detail[1]
            config_path.write_text(json.dumps(config))
        elif kind == "config bytes":
            config_path.write_bytes(detail)
        elif kind == "weights flipped":
            data = bytearray(weights.read_bytes())
            data[detail % len(data)] ^= 0x40
            weights.write_bytes(bytes(data))
        elif kind == "weights cut":
            weights.write_bytes(weights.read_bytes()[:detail % weights.stat().st_size])
        elif kind == "weights reshaped":
            tensors = load_file(str(weights))
            key = sorted(tensors)[detail[0] % len(tensors)]
            tensors[key] = torch.zeros(detail[0], 3, dtype=detail[1])
            save_file(tensors, str(weights))
        else:
            (config_path if detail % 2 else weights).unlink()
        try:
            check_adapter("--init-adapter", str(adapter), MODEL_CONFIG)
            event("accepted")
        except BadInput as e:
            assert one_line(str(e)).startswith(f"--init-adapter {adapter}: "), str(e)
            event("refused")


# ---------------------------------------------------------------------- checkpoints
TWO_LAYERS = ModelConfig(vocab_size=37, hidden_size=24, intermediate_size=38, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@st.composite
def state_edits(draw):
    field = draw(st.sampled_from(["step", "epoch", "batch_index", "manifest_format", "config",
                                  "optimizer", "__whole__"]))
    return field, draw(json_values), draw(st.sampled_from(["keep", "remove", "rewrite"]))


@cases(200)
@given(edit=state_edits())
def test_an_edited_checkpoint_is_damaged_refused_or_consistent(edit):
    from anita_core.train.file_manifest import MANIFEST_FILE, write_manifest
    field, value, manifest = edit
    with scratch() as folder:
        adapters = LoRAAdapters.init(LoRAConfig(r=2, alpha=4, seed=0), TWO_LAYERS)
        for step in (1, 2):
            state = {"step": step, "epoch": 0, "batch_index": step, "optimizer": {"state": {}}}
            checkpoint = save_checkpoint(folder, step, adapters, state, keep=0)
        path = checkpoint / "trainer_state.json"
        data = json.loads(path.read_text())
        if field == "__whole__":
            data = value
        else:
            data["__dict__"][field] = value
        path.write_text(json.dumps(data))
        if manifest == "remove":
            (checkpoint / MANIFEST_FILE).unlink()
        elif manifest == "rewrite":
            write_manifest(checkpoint)
        problem = checkpoint_damage(checkpoint)
        if manifest != "rewrite":
            assert problem is not None, "an edit the manifest does not cover is damage"
        if problem is not None:
            one_line(problem)
            event("damaged")
            return
        try:
            state = load_checkpoint_state(checkpoint)
        except (ValueError, FileNotFoundError) as e:
            one_line(str(e))
            event("unreadable state")
            return
        problem = position_problem(state, micro_batches=3, span=1, world=1)
        if problem is not None:
            one_line(problem)
        event("position refused" if problem else "consistent")


# ---------------------------------------------------------------------- flags
VALUE_FLAGS = ["--learning-rate", "--lora-r", "--lora-alpha", "--lora-dropout", "--batch-size",
               "--gradient-accumulation-steps", "--max-steps", "--seed", "--eval-split", "--warmup-ratio",
               "--num-epochs", "--save-minutes", "--max-samples", "--threads", "--target-modules",
               "--dtype", "--memory-budget", "--global-batch-size", "--max-grad-norm", "--system-prompt"]
ODD_VALUES = st.one_of(
    st.sampled_from(["-1e-4", "-.5", "-1E3", "-inf", "nan", "inf", "1e309", "", " ", "0x10", "1_0",
                     "٣", "1e-400", "-0", "2**31", "1,5", "\udcff", "-", "--", "-x"]),
    HUGE_NUMBERS, st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(repr),
    st.text(max_size=12))


@cases(600)
@given(script=st.sampled_from(["train_sft.py", "train_dpo.py", "chat.py"]),
       pairs=st.lists(st.tuples(st.sampled_from(VALUE_FLAGS), ODD_VALUES, st.booleans()), min_size=1,
                      max_size=3))
def test_odd_flag_values_are_accepted_or_one_line_naming_the_flag(script, pairs, capsys):
    argv = []
    for flag, value, joined in pairs:
        argv += [f"{flag}={value}"] if joined else [flag, value]
    threads = torch.get_num_threads()
    try:
        if script == "chat.py":
            if any(flag in ("--learning-rate",) for flag, _, _ in pairs):
                argv = [a.replace("--learning-rate", "--temperature") for a in argv]
            parser = chat.build_parser()
            parser.parse_args(["--model", BUNDLED_MODEL, *argv, "hi"])
        else:
            main = train_sft if script == "train_sft.py" else train_dpo
            parse_command_line(main.build_parser, argv)
        event("accepted")
    except SystemExit as e:
        assert e.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"{script}: error: "), lines
        assert lines[1] == f"({script} --help lists every flag and its default)"
        event("refused")
    finally:
        torch.set_num_threads(threads)


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file / "run", tmp_path / ("x" * 300)):
        with pytest.raises(SystemExit) as e:
            train_sft.main(["--output-dir", str(out), "--no-progress", "--max-steps", "1"])
        assert e.value.code == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"error: --output-dir {out}: cannot be used ("), line


# ---------------------------------------------------------------------- the CLI end to end
@pytest.fixture(scope="module")
def unloadable_model(tmp_path_factory):
    """The bundled model with every weight NaN, its header intact: it passes the
    folder's checks and fails to load, so a run that accepts its data stops there."""
    folder = tmp_path_factory.mktemp("nan-model") / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:start] + b"\xff" * (len(data) - start))
    return folder


@cases(100, deadline=timedelta(seconds=20))
@given(data=jsonl_files(), skip=st.booleans())
def test_train_sft_on_fuzzed_data_says_one_line(data, skip, unloadable_model, capsys):
    with scratch() as folder:
        path, out = folder / "data.jsonl", folder / "run"
        path.write_bytes(data)
        argv = ["--model", str(unloadable_model), "--data", str(path), "--output-dir", str(out),
                "--no-progress", "--max-steps", "1", "--eval-split", "0"] + (["--skip-bad-rows"] if skip else [])
        try:
            code = train_sft.main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        assert errors[0].startswith((f"error: {path}", f"error: --model {unloadable_model}: cannot load")), err
        event("data refused" if errors[0].startswith(f"error: {path}") else "data accepted")
        assert not out.exists(), "a refused run leaves no folder behind"
