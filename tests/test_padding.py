"""A packed batch is as wide as its longest row (rounded up), not --max-seq-length
(issue 19): the width changes no loss or gradient of the real tokens, and the run
summary reports the padding share of the tokens computed.

Padding positions have target -100 (no loss, no gradient row) and segment -1 (no
query attends them, their own attention output is 0), so a wider batch only adds
exact zeros to the LoRA gradients' sums over tokens, and its per-token values are
the same computations on the same rows. What can move is the rounding of the fp32
sums over tokens (another length may let BLAS block the reduction differently):
the tolerances are test_model_vs_hf's for regrouped fp32 sums (loss 1e-5 relative,
gradients 1e-4 of each tensor's largest entry)."""
from __future__ import annotations

import torch

from anita_core.assets import sample_path
from anita_core.data import (SFTDataConfig, build_sft_data, collate_rows, load_tokenizer,
                             next_fit_rows, sft_batches)
from anita_core.hf import load_model
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.cli.common import BUNDLED_MODEL
from anita_core.train.objectives import SFTObjective
from tests.helpers import assert_close

SEQ_LEN = 384


def test_the_batch_width_changes_no_loss_or_gradient_of_the_real_tokens():
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    data = build_sft_data(SFTDataConfig(sample_path("instruction"), max_seq_length=SEQ_LEN,
                                        max_samples=6, seed=1), tokenizer)
    (narrow,) = sft_batches(data.train, batch_size=2, seq_len=SEQ_LEN, pad_id=tokenizer.pad_id)
    # the same rows as they were collated before issue 19: padded out to seq_len
    rows = [[data.train[i] for i in row] for row in next_fit_rows([len(d) for d in data.train], SEQ_LEN)]
    wide = collate_rows(rows, pad_id=tokenizer.pad_id, length=SEQ_LEN)
    width = narrow["input_ids"].shape[1]
    assert width < SEQ_LEN and torch.equal(wide["input_ids"][:, :width], narrow["input_ids"])
    assert bool((wide["segment_ids"][:, width:] == -1).all())

    model = load_model(BUNDLED_MODEL, progress=False)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=0.0, seed=5), model.config)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)) * 0.1)
    objective = SFTObjective(model)
    units = objective.units(narrow)
    assert units == objective.units(wide) > 0
    results = []
    for batch in (wide, narrow):
        model.adapters.zero_grad()
        sums = objective.micro_step(batch, 1.0 / units)
        results.append((float(sums["loss"]), [p.grad.clone() for p in model.adapters.parameters()]))
    (loss_wide, grads_wide), (loss_narrow, grads_narrow) = results
    assert abs(loss_narrow - loss_wide) <= 1e-5 * abs(loss_wide)
    for i, (a, b) in enumerate(zip(grads_narrow, grads_wide)):
        assert float(b.abs().max()) > 0, i
        assert_close("padding width", f"LoRA grad {i}", a, b, atol=1e-4 * float(b.abs().max()),
                     rtol=1e-4)
