"""anita's benchmark harness (measurements only: nothing in the project imports it).

    python -m bench.kernels      every csrc_triton op against its peers
    python -m bench.nf4_matmul   the fused NF4 matmul against dequantize-then-cuBLAS
    python -m bench.train        QLoRA training throughput against transformers + PEFT + bnb
    python -m bench.plot CSV     PNG plots from any of their CSVs

Each takes --smoke: tiny shapes on the CPU through the Triton interpreter, a
check that the harness still runs; its output is labelled as a smoke run and
is never a performance number. See bench/README.md.
"""
