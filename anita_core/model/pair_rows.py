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

With ``with_prompt`` (ORPO's NLL over the chosen sequence, prompt included) the
batch's prompt scores (prompt_score_*: the prompt's position t scores prompt token
t+1, once per pair: the prompt is shared) join the scores as sequences 2n + k, so
the sums come as [chosen | rejected | prompt] and one backward serves them all;
without it the prompt scores are not gathered, and nothing extra is computed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from anita_core.model.batch_facts import IGNORE_INDEX, BatchFacts, batch_facts
from anita_core.model.ops import token_logprobs_backward, token_logprobs_forward

BOUND_KEYS = ("first_key", "key_end", "gap_start", "gap_end")
PROMPT_SCORE_KEYS = ("prompt_score_index", "prompt_score_targets", "prompt_score_pair")


def pair_bounds(batch: dict) -> Tuple[torch.Tensor, ...]:
    """The batch's four attention bounds, int32 [B, S] each, contiguous."""
    return tuple(batch[k].to(torch.int32).contiguous() for k in BOUND_KEYS)


def scores(batch: dict, with_prompt: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat positions, targets, sequences) scored; with_prompt adds each pair's
    prompt scores as sequence 2 x pairs + pair."""
    index, targets, sequence = batch["score_index"], batch["score_targets"], batch["score_sequence"]
    if not with_prompt:
        return index, targets, sequence
    missing = [k for k in PROMPT_SCORE_KEYS if k not in batch]
    if missing:
        raise ValueError(f"packed DPO batch without {', '.join(missing)}: the chosen sequences' "
                         "NLL needs the prompt scores (data/dpo_pack.py)")
    index_p, targets_p, pair = (batch[k] for k in PROMPT_SCORE_KEYS)
    return (torch.cat([index, index_p]), torch.cat([targets, targets_p]),
            torch.cat([sequence, sequence_count(batch) + pair]))


def packed_facts(batch: dict, vocab_size: int, with_prompt: bool = False) -> BatchFacts:
    """batch_facts of a CPU-side packed batch (its scores are its targets)."""
    return batch_facts(batch["input_ids"], scores(batch, with_prompt)[1], batch["position_ids"],
                       vocab_size)


def sequence_count(batch: dict) -> int:
    """2 x pairs: chosen sequences then rejected ones."""
    return int(batch["completion_tokens"].shape[0])


def packed_sequence_logps(model, batch: dict, *, for_backward: bool,
                          facts: Optional[BatchFacts] = None, with_prompt: bool = False):
    """(summed completion log-probs fp32 [2 x pairs], chosen then rejected, then with
    ``with_prompt`` each pair's summed prompt log-probs [pairs]; the state
    ``packed_logprobs_backward`` needs, or None)."""
    hidden, state = model.forward_hidden(batch["input_ids"], batch["position_ids"], None,
                                         for_backward=for_backward, facts=facts,
                                         bounds=pair_bounds(batch))
    index, targets, sequence = scores(batch, with_prompt)
    targets = targets.contiguous()
    gathered = hidden.index_select(0, index)
    num = None if facts is None else facts.num_targets
    with torch.no_grad():
        logp, lse = token_logprobs_forward(gathered, model.base.output_embedding, targets,
                                           IGNORE_INDEX, num_targets=num)
    n_seq = sequence_count(batch) * 3 // 2 if with_prompt else sequence_count(batch)
    seq = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device)
    seq.index_add_(0, sequence, logp)
    saved = None
    if for_backward:
        saved = (gathered, targets, lse, index, sequence, hidden.shape, state, num)
    return seq, saved


def packed_logprobs_backward(model, d_seq: torch.Tensor, saved) -> None:
    """Back-propagate d(loss)/d(per-sequence sums) (fp32, as packed_sequence_logps
    returned them) into the LoRA .grad: each score's log p gets its sequence's."""
    gathered, targets, lse, index, sequence, hidden_shape, state, num = saved
    d_scores = d_seq[sequence]
    d_gathered, _ = token_logprobs_backward(d_scores.float().contiguous(), gathered,
                                            model.base.output_embedding, targets, lse,
                                            IGNORE_INDEX, num_targets=num)
    d_hidden = torch.zeros(hidden_shape, dtype=d_gathered.dtype, device=d_gathered.device)
    d_hidden.index_add_(0, index, d_gathered)
    del d_gathered
    model.backward_hidden(d_hidden, state)
