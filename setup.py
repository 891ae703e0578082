from setuptools import find_packages, setup

setup(
    name="anita",
    version="0.1.0",
    description="NF4 QLoRA trainer for LLaMA-3-family models, every hot op a hand-written Triton kernel",
    python_requires=">=3.10",
    packages=find_packages(include=["csrc_triton", "csrc_triton.*", "csrc_torch", "csrc_torch.*", "anita_core", "anita_core.*"]),
    include_package_data=True,
    package_data={"anita_core": ["assets/**/*"]},
    install_requires=[
        # Install torch first (pinned CPU build on CPU machines, see README):
        # a bare torch requirement would otherwise pull a multi-GB CUDA build.
        # The supported range is what the tests check (tests/test_supported_tritons.py):
        # triton 3.6 (the lent GPU machine's) and 3.9 (pinned) in every test run, torch
        # 2.13 there and 2.11 (the GPU machine's) in bench/device_twin.sh.
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10",
        "bitsandbytes>=0.45",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        # local Parquet files (anita_core/data/table.py); JSON, JSONL and CSV need nothing
        "pyarrow>=15",
        "numpy>=1.26",
        "tqdm>=4.66",
        # checkpoint manifests hash with xxh3-128 (anita_core/train/file_manifest.py)
        "xxhash>=3",
        # chat templates (--template chat) run in its sandbox; 3.1.6 fixed sandbox escapes
        "jinja2>=3.1.6",
    ],
    extras_require={
        # hypothesis: the fuzzer over every input a user hands anita (tests/test_fuzz_inputs.py)
        "test": ["datasets>=2.19", "transformers>=4.45", "peft>=0.13", "trl>=0.12", "pytest>=8", "accelerate>=0.34",
                 "matplotlib>=3.8", "gguf>=0.10", "lm-eval>=0.4.13,<0.5", "tensorboard>=2.14", "wandb>=0.31",
                 "hypothesis>=6.100"],
        # --report-to tensorboard (torch.utils.tensorboard writes, tensorboard reads): ~57 MB
        # installed with grpcio, protobuf and its data server
        "tensorboard": ["tensorboard>=2.14"],
        # --report-to wandb: ~75 MB installed with its dependencies; 0.31 is the version checked
        # (offline runs that rewind on a resume, synced in order by `wandb sync`)
        "wandb": ["wandb>=0.31"],
        # the run's curves (OUTPUT_DIR/curves.png, python -m anita_core.plot)
        "plot": ["matplotlib>=3.8"],
        # eval.py: lm-evaluation-harness (its TemplateLM API of 0.4.x); about 350 MB with its
        # dependencies (scikit-learn, scipy, nltk, sacrebleu, evaluate, ...)
        "eval": ["lm-eval>=0.4.13,<0.5", "transformers>=4.45", "peft>=0.13"],
        "bench": ["matplotlib>=3.8"],
        # a hub dataset name as --data (local files are read without it)
        "hub": ["datasets>=2.19"],
        # python -m anita_core.assets.smollm2: transformers reads the GGUF with gguf
        "real-model": ["gguf>=0.10", "transformers>=4.45"],
    },
)
