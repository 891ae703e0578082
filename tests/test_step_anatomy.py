"""bench/step_anatomy.py: the per-layer figures of one SFT step of the bundled tiny
model are within issue 14's targets, and the counting can tell when they are not."""
from __future__ import annotations

import pytest
import torch

from bench import step_anatomy

# issue 14, per layer per step (SFT, LoRA on all 7 projections, no dropout, every
# layer recomputed in the backward): Triton launches + torch matmuls, and bytes of
# dtype-conversion copies in units of one [tokens x hidden] activation
MAX_LAUNCHES_PLUS_MATMULS = 48
MAX_WITHOUT_RECOMPUTE = 36          # activations kept, nothing recomputed
MAX_CONVERSION_ACTIVATIONS = 2.0
SMALL = ["--dtype", "bf16", "--batch", "1", "--seq", "24", "--rank", "4"]


def measure(*extra):
    return step_anatomy.measure(step_anatomy.parse_args(SMALL + list(extra)))


def test_every_layer_within_the_targets():
    result = measure()
    assert set(result["layers"]) == {"layer 0", "layer 1"}
    for name, row in result["layers"].items():
        assert row["launches_plus_matmuls"] <= MAX_LAUNCHES_PLUS_MATMULS, (name, row)
        assert row["conversion_copies_in_activations"] <= MAX_CONVERSION_ACTIVATIONS, (name, row)
        kernels = row["launches_by_kernel"]
        # q/k/v and gate/up as one NF4 matmul each: 4 forwards x (forward + recompute)
        assert kernels["_nf4_matmul_fwd_kernel"] == 8 and kernels["_nf4_matmul_bwd_input_kernel"] == 4
        assert "_swiglu_backward_kernel" not in kernels      # in the down projection's epilogue
        # with recompute the projections run forward twice: at least 1.5x the minimum
        assert row["flops_vs_minimum"] >= 1.5 and row["peak_live_in_activations"] > 0


def test_without_recompute_within_the_target():
    for name, row in measure("--no-recompute")["layers"].items():
        assert row["launches_plus_matmuls"] <= MAX_WITHOUT_RECOMPUTE, (name, row)
        assert row["conversion_copies_in_activations"] <= MAX_CONVERSION_ACTIVATIONS, (name, row)
        assert row["launches_by_kernel"]["_nf4_matmul_fwd_kernel"] == 4


def test_recorder_counts_matmuls_conversions_and_flops():
    recorder = step_anatomy.StepRecorder()
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    w = torch.randn(4, 3)
    with recorder:
        y = x.float()                       # 8 x 4 fp32 written: 128 bytes
        z = torch.mm(y, w)
        x.to(torch.bfloat16)                # same dtype: no conversion
    section = recorder.sections[step_anatomy.OUTSIDE]
    assert (section.matmuls, section.conversion_bytes, section.flops) == (1, 128, 2 * 8 * 4 * 3)
    assert recorder.peak_bytes >= y.numel() * 4 + z.numel() * 4


def test_the_counts_see_unfused_projections():
    unfused = measure("--no-fusion")
    for name, row in unfused["layers"].items():
        assert row["launches_plus_matmuls"] > MAX_LAUNCHES_PLUS_MATMULS, (name, row)
        assert row["launches_by_kernel"]["_nf4_matmul_fwd_kernel"] == 14


def test_bad_flags_are_argparse_errors(capsys):
    for flags, word in ((["--seq", "0"], "--seq"), (["--dropout", "1.5"], "--dropout"),
                        (["--model", "/nonexistent"], "--model")):
        with pytest.raises(SystemExit):
            step_anatomy.parse_args(flags)
        assert word in capsys.readouterr().err
