"""The model side of packed DPO pairs (anita_core.data.dpo_pack): one forward over
rows of [prompt | chosen | rejected] spans, scored at gathered positions.

The batch carries its attention bounds (first_key, key_end, gap_start, gap_end),
its positions and its scores (flat position, target, sequence). The final hidden
rows at the scored positions are gathered (the prompt's last row twice, once per
answer), the token-logprobs op runs on the gathered rows only, and per-sequence
sums come from an index_add over the scores' sequences. The backward runs the
token-logprobs backward on the gathered rows and adds their gradients back into
the [B*S, H] hidden gradient (index_add: the prompt's last row gets both), then
through the blocks as usual.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from anita_core.model.batch_facts import IGNORE_INDEX, BatchFacts, batch_facts
from anita_core.model.ops import token_logprobs_backward, token_logprobs_forward

BOUND_KEYS = ("first_key", "key_end", "gap_start", "gap_end")


def pair_bounds(batch: dict) -> Tuple[torch.Tensor, ...]:
    """The batch's four attention bounds, int32 [B, S] each, contiguous."""
    return tuple(batch[k].to(torch.int32).contiguous() for k in BOUND_KEYS)


def packed_facts(batch: dict, vocab_size: int) -> BatchFacts:
    """batch_facts of a CPU-side packed batch (its scores are its targets)."""
    return batch_facts(batch["input_ids"], batch["score_targets"], batch["position_ids"], vocab_size)


def sequence_count(batch: dict) -> int:
    """2 x pairs: chosen sequences then rejected ones."""
    return int(batch["completion_tokens"].shape[0])


def packed_sequence_logps(model, batch: dict, *, for_backward: bool,
                          facts: Optional[BatchFacts] = None):
    """(summed completion log-probs fp32 [2 x pairs], chosen then rejected; the state
    ``packed_logprobs_backward`` needs, or None)."""
    hidden, state = model.forward_hidden(batch["input_ids"], batch["position_ids"], None,
                                         for_backward=for_backward, facts=facts,
                                         bounds=pair_bounds(batch))
    index, targets = batch["score_index"], batch["score_targets"].contiguous()
    gathered = hidden.index_select(0, index)
    num = None if facts is None else facts.num_targets
    with torch.no_grad():
        logp, lse = token_logprobs_forward(gathered, model.base.output_embedding, targets,
                                           IGNORE_INDEX, num_targets=num)
    seq = torch.zeros(sequence_count(batch), dtype=logp.dtype, device=logp.device)
    seq.index_add_(0, batch["score_sequence"], logp)
    saved = None
    if for_backward:
        saved = (gathered, targets, lse, index, hidden.shape, state, num)
    return seq, saved


def packed_logprobs_backward(model, d_scores: torch.Tensor, saved) -> None:
    """Back-propagate d(loss)/d(log p) of every score (fp32 [scores]) into the LoRA .grad."""
    gathered, targets, lse, index, hidden_shape, state, num = saved
    d_gathered, _ = token_logprobs_backward(d_scores.float().contiguous(), gathered,
                                            model.base.output_embedding, targets, lse,
                                            IGNORE_INDEX, num_targets=num)
    d_hidden = torch.zeros(hidden_shape, dtype=d_gathered.dtype, device=d_gathered.device)
    d_hidden.index_add_(0, index, d_gathered)
    del d_gathered
    model.backward_hidden(d_hidden, state)
