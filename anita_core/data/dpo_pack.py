"""DPO pairs packed without padding, each pair's prompt computed once.

A micro-batch holds the same pairs as the padded one (data/dpo.py collate_pairs),
laid into rows of at most ``budget`` tokens, in order (next fit, as the SFT
packer), each pair as one span

    [prompt | chosen | rejected]

and the batch is as wide as its longest row rounded up to PAIR_WIDTH_MULTIPLE (16),
never beyond the budget (packing.packed_width, the SFT packer's rule with a finer
step): that rounding is the only padding.

A pair longer than the budget gets a row of its own, whole: truncation is the
data pipeline's job (dpo.truncate_pair, TRL's max_length / max_prompt_length),
done before packing, so packing never changes what is trained on; such a row
only makes that batch wider than the budget.

Inside a span starting at p0 with prompt P, chosen C and rejected R tokens:
  attention  a prompt or chosen query at i sees keys [p0, i] (causal); a rejected
             query sees [p0, i] minus the chosen tokens [p0+P, p0+P+C). As the
             attention launchers' per-token bounds (first_key, key_end, gap_start,
             gap_end), int32 [B, S]: query i sees [first_key[i], i] minus
             [gap_start[i], gap_end[i]); key j is seen by queries [j, key_end[j])
             except those whose gap holds j. Padding: first_key = i + 1 (sees
             nothing), key_end = j (seen by nobody), as document_bounds.
  positions  0 .. P-1 on the prompt, and both answers continue from P.
  scoring    the prompt's last position scores the first token of BOTH answers;
             chosen position k scores chosen token k+1, rejected likewise; the
             last token of each answer scores nothing. A score is (flat position,
             target token, sequence), sequence = pair k's chosen (k) or rejected
             (n + k): the layout DPOObjective stacks a padded batch in.
  prompt     prompt position t (t < P - 1) scores prompt token t + 1, once per pair
             (prompt_score_index / _targets / _pair): the chosen sequence's NLL
             over prompt and answer (ORPO, as TRL's ORPOTrainer: every token after
             the first) is these plus the chosen scores. Only a loss that needs it
             gathers them (model/pair_rows.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from anita_core.data.packing import next_fit_rows, packed_width

# The SFT packer rounds widths to 128 to keep distinct widths (compiles, autotuning
# passes) few. A DPO row is one micro-batch's pairs (about 1,500 tokens at the dpo
# preset), where rounding to 128 wastes ~4% of the positions; 16 keeps every width a
# multiple of 16 (Triton specializes integer arguments on divisibility by 16, so no
# new compile; the attention kernels bucket seq by powers of two) and wastes < 1%.
PAIR_WIDTH_MULTIPLE = 16

# the batch's keys (all tensors, so the trainer moves it to the device as is)
BOUND_KEYS = ("first_key", "key_end", "gap_start", "gap_end")
SCORE_KEYS = ("score_index", "score_targets", "score_sequence")
PROMPT_SCORE_KEYS = ("prompt_score_index", "prompt_score_targets", "prompt_score_pair")
PACKED_MARK = "score_index"     # a DPO batch holding this key is packed


def pair_length(pair) -> int:
    """Positions a packed pair takes: prompt once, then both answers."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def padded_positions(pairs: Sequence, pad_to_multiple_of: Optional[int] = None) -> int:
    """Positions the padded layout (collate_pairs) computes for these pairs in one batch:
    2 x pairs rows, each as wide as the longest prompt + answer."""
    width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return 2 * len(pairs) * width


def pair_rows(pairs: Sequence, budget: int) -> List[List[int]]:
    """Pair indices per row (next fit, in order); a pair longer than the budget
    gets a row of its own."""
    if budget < 1:
        raise ValueError(f"pack budget must be >= 1 token, got {budget}")
    return next_fit_rows([pair_length(p) for p in pairs], budget, oversize_alone=True)


def collate_packed_pairs(pairs: Sequence, *, budget: int, pad_id: int,
                         multiple: Optional[int] = PAIR_WIDTH_MULTIPLE) -> Dict[str, torch.Tensor]:
    """One packed DPO batch (see the module docstring) of ``pairs``."""
    if not pairs:
        raise ValueError("collate_packed_pairs: no pairs")
    for k, p in enumerate(pairs):
        if not p.prompt_ids or not p.chosen_ids or not p.rejected_ids:
            raise ValueError(f"collate_packed_pairs: pair {k} has an empty prompt or answer")
    rows = pair_rows(pairs, budget)
    longest = max(sum(pair_length(pairs[i]) for i in row) for row in rows)
    width = packed_width(longest, budget, multiple)
    shape = (len(rows), width)
    index = torch.arange(width, dtype=torch.int32).expand(shape)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.int64),
             "position_ids": torch.zeros(shape, dtype=torch.int64),
             "first_key": (index + 1).clone(), "key_end": index.clone(),
             "gap_start": torch.zeros(shape, dtype=torch.int32),
             "gap_end": torch.zeros(shape, dtype=torch.int32)}
    n = len(pairs)
    scores: List[List[int]] = [[], [], []]
    prompt_scores: List[List[int]] = [[], [], []]
    tokens = torch.zeros(2 * n, dtype=torch.int64)
    for r, row in enumerate(rows):
        p0 = 0
        for k in row:
            pair = pairs[k]
            P, C, R = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            c0, r0, end = p0 + P, p0 + P + C, p0 + P + C + R
            batch["input_ids"][r, p0:end] = torch.tensor(
                list(pair.prompt_ids) + list(pair.chosen_ids) + list(pair.rejected_ids))
            batch["position_ids"][r, p0:c0] = torch.arange(P)
            batch["position_ids"][r, c0:r0] = torch.arange(P, P + C)
            batch["position_ids"][r, r0:end] = torch.arange(P, P + R)
            batch["first_key"][r, p0:end] = p0
            batch["key_end"][r, p0:c0] = end       # the prompt: every later query of the pair
            batch["key_end"][r, c0:r0] = r0        # chosen keys: chosen queries only
            batch["key_end"][r, r0:end] = end
            batch["gap_start"][r, r0:end], batch["gap_end"][r, r0:end] = c0, r0
            base = r * width
            prompt_scores[0] += [base + p0 + t for t in range(P - 1)]
            prompt_scores[1] += list(pair.prompt_ids[1:])
            prompt_scores[2] += [k] * (P - 1)
            for seq, answer, a0 in ((k, pair.chosen_ids, c0), (n + k, pair.rejected_ids, r0)):
                # position a0 - 1 + t scores answer[t]; for t = 0 that is the prompt's last
                at = [base + c0 - 1] + [base + a0 + t - 1 for t in range(1, len(answer))]
                scores[0] += at
                scores[1] += list(answer)
                scores[2] += [seq] * len(answer)
                tokens[seq] = len(answer)
            p0 = end
    batch.update({name: torch.tensor(v, dtype=torch.int64) for name, v in zip(SCORE_KEYS, scores)})
    batch.update({name: torch.tensor(v, dtype=torch.int64)
                  for name, v in zip(PROMPT_SCORE_KEYS, prompt_scores)})
    batch["completion_tokens"] = tokens
    batch["padded_positions"] = torch.tensor(padded_positions(pairs))
    return batch


def packed_dpo_batches(pairs: Sequence, *, batch_size: int, budget: int, pad_id: int,
                       multiple: Optional[int] = PAIR_WIDTH_MULTIPLE) -> List[Dict[str, torch.Tensor]]:
    """Packed batches of ``batch_size`` pairs each, in the given order (the caller
    shuffles, as for dpo_batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [collate_packed_pairs(pairs[i:i + batch_size], budget=budget, pad_id=pad_id,
                                 multiple=multiple)
            for i in range(0, len(pairs), batch_size)]


def dense_visibility(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [B, S, S]: query i sees key j, from the bounds' query side (for tests and
    for checking a batch; O(S^2))."""
    first, gs, ge = (batch[k].long() for k in ("first_key", "gap_start", "gap_end"))
    S = first.shape[1]
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    in_gap = (j >= gs[:, :, None]) & (j < ge[:, :, None])
    return (j <= i) & (j >= first[:, :, None]) & ~in_gap


def dense_visibility_by_keys(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The same from the key side (key_end and the queries' gaps): the two must agree."""
    key_end, gs, ge = (batch[k].long() for k in ("key_end", "gap_start", "gap_end"))
    S = key_end.shape[1]
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    in_gap = (j >= gs[:, :, None]) & (j < ge[:, :, None])
    return (j <= i) & (i < key_end[:, None, :]) & ~in_gap
