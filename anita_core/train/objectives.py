"""What one micro-batch means for each training stage.

SFT: the fused lm-head cross-entropy of QLoRALlama.train_step; unit = target token.
DPO: the policy's per-token log-probs on chosen and rejected sequences, summed
per sequence, against a reference (the base with adapters off, or a given
frozen adapter) for the losses that have one; unit = preference pair. The
preference loss (train.preference_losses) is differentiated by torch on
[pairs]-sized tensors only; that per-sequence gradient is spread over
the completion tokens and pushed through the model's hand-written backward.

Nothing here makes the host wait for the device: what the model needs to know
about a batch (its target count, its positions' reach, that its ids are in the
vocabulary) is read from the CPU-side batch (batch_facts), the batch goes up
without blocking, and the sums a micro-batch reports are device tensors that the
trainer reads back once per optimizer step (host_reads).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import torch

from anita_core.model.batch_facts import BatchFacts, batch_facts
from anita_core.model import pair_rows
from anita_core.train.host_reads import batch_to_device, read_floats, to_device
from anita_core.train.losses import PreferenceLogps
from anita_core.train.preference_losses import (PREFERENCE_LOSSES, PreferenceLoss, SequenceLogps,
                                                resolve_options)
from anita_core.train.reference_logprobs import INDEX_KEY
from anita_core.model import IGNORE_INDEX


def _real_tokens(batch: dict) -> int:
    """Tokens that are not padding, counted on the CPU-side batch."""
    if _packed(batch):      # padding: key_end[j] = j (seen by nobody)
        return int((batch["key_end"] > torch.arange(batch["key_end"].shape[-1])).sum())
    seg = batch.get("segment_ids")
    return int((seg >= 0).sum()) if seg is not None else batch["input_ids"].numel()


def _facts(model, batch: dict) -> BatchFacts:
    return batch_facts(batch["input_ids"], batch["targets"], batch.get("position_ids"),
                       model.config.vocab_size)


class SFTObjective:
    def __init__(self, model):
        self.model = model

    def units(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def micro_step(self, batch, grad_scale: float) -> Dict[str, object]:
        facts = _facts(self.model, batch)
        b = batch_to_device(batch, self.model.device)
        loss_sum, _ = self.model.train_step(b["input_ids"], b["targets"], b.get("position_ids"),
                                            b.get("segment_ids"), grad_scale=grad_scale, facts=facts)
        return {"loss": loss_sum, "tokens": _real_tokens(batch), "computed": batch["input_ids"].numel()}

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        total, count = 0.0, 0           # the loss sums stay on the device, in float64
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                facts = _facts(self.model, batch)
                b = batch_to_device(batch, self.model.device)
                loss_sum, _ = self.model.loss(b["input_ids"], b["targets"], b.get("position_ids"),
                                              b.get("segment_ids"), facts=facts)
                total, count = total + loss_sum.double(), count + facts.num_targets
        finally:
            self.model.train(was_training)
        return {"eval_loss": read_floats({"sum": total})["sum"] / max(count, 1)}


def _stack_pair(batch: dict) -> dict:
    """One model batch holding the chosen rows then the rejected rows."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    if chosen["input_ids"].shape != rejected["input_ids"].shape:
        raise ValueError("chosen and rejected batches must be padded to one shape, got "
                         f"{tuple(chosen['input_ids'].shape)} and {tuple(rejected['input_ids'].shape)}")
    return {k: torch.cat([chosen[k], rejected[k]]) for k in chosen if chosen.get(k) is not None}


def _with_prompt_targets(host: dict) -> dict:
    """A stacked padded batch whose chosen rows also score their prompt: position t
    scores token t + 1 wherever that token is attended (TRL's ORPOTrainer: the chosen
    sequence's every token after the first); ``prompt_targets`` keeps those alone."""
    targets, seg, ids = host["targets"], host["segment_ids"], host["input_ids"]
    prompt = torch.full_like(targets, IGNORE_INDEX)
    n = targets.shape[0] // 2
    attended_next = seg[:n, 1:] >= 0
    free = targets[:n, :-1] == IGNORE_INDEX
    prompt[:n, :-1] = torch.where(attended_next & free, ids[:n, 1:], IGNORE_INDEX)
    return {**host, "prompt_targets": prompt,
            "targets": torch.where(prompt != IGNORE_INDEX, prompt, targets)}


class DPOObjective:
    """``loss_type``: a name of preference_losses.PREFERENCE_LOSSES, ``beta`` and
    ``options`` its hyperparameters (the table's defaults for the others).
    ``reference_adapters``: None = the base model (adapters off); otherwise a frozen
    LoRAAdapters (e.g. the SFT adapter) swapped in for the reference pass.
    ``reference_store``: the reference log-probs of every pair computed once
    (reference_logprobs.ReferenceLogps); batches then carry ``example_index``
    and a step, or an evaluation, runs only the policy.
    ``loss``: a PreferenceLoss record to use instead of the table's ``loss_type``
    (its defaults apply). A reference-free loss gets no reference pass (reference
    None); a loss that needs_sequence_logps gets the chosen sequences' prompt
    log-probs too, the only losses for which the model scores the prompt."""

    def __init__(self, model, beta: float = 0.1, loss_type: str = "sigmoid",
                 reference_adapters=None, reference_store=None,
                 loss: Optional[PreferenceLoss] = None, options: Optional[Dict[str, float]] = None):
        self.model, self.beta, self.loss_type = model, beta, loss_type
        if loss is None:
            self.loss = PREFERENCE_LOSSES.get(loss_type)
            self.options = resolve_options(loss_type, {"beta": beta, **(options or {})})
        else:
            self.loss = loss
            self.options = {**loss.defaults, "beta": beta, **(options or {})}
        self.with_prompt = self.loss.needs_sequence_logps
        self.reference_adapters = reference_adapters
        self.reference_store = reference_store
        self.reference_passes = 0       # reference forwards run (one per stacked batch)

    def units(self, batch) -> int:
        if _packed(batch):
            return pair_rows.sequence_count(batch) // 2
        return int(batch["chosen"]["input_ids"].shape[0])

    @contextmanager
    def _reference_mode(self):
        model, previous, was_training = self.model, self.model.adapters, self.model.training
        model.eval()  # no LoRA dropout in the reference pass
        try:
            if self.reference_adapters is not None:
                model.adapters = self.reference_adapters
                yield
            else:
                with previous.disabled():
                    yield
        finally:
            model.adapters = previous
            model.train(was_training)

    def _sequence_logps(self, stacked: dict, for_backward: bool, facts: Optional[BatchFacts],
                        with_prompt: bool = False):
        """Per-sequence sums [2 x pairs] (chosen, rejected), then with ``with_prompt``
        the chosen prompts' sums [pairs]; and the backward's state."""
        if _packed(stacked):
            return pair_rows.packed_sequence_logps(self.model, stacked, for_backward=for_backward,
                                                   facts=facts, with_prompt=with_prompt)
        logp, saved = self.model.token_logprobs(stacked["input_ids"], stacked["targets"],
                                                stacked.get("position_ids"), stacked.get("segment_ids"),
                                                for_backward=for_backward, facts=facts)
        if not with_prompt:
            return logp.sum(dim=1), saved
        prompt = (stacked["prompt_targets"] != IGNORE_INDEX).to(logp.dtype)
        n = logp.shape[0] // 2
        return torch.cat([(logp * (1 - prompt)).sum(dim=1), (logp * prompt).sum(dim=1)[:n]]), saved

    def _backward(self, stacked: dict, d_seq: torch.Tensor, saved) -> None:
        if _packed(stacked):
            pair_rows.packed_logprobs_backward(self.model, d_seq, saved)
            return
        counted = (stacked["targets"] != IGNORE_INDEX).to(d_seq.dtype)
        n_rows = counted.shape[0]
        d_rows = d_seq[:n_rows, None] * counted
        if self.with_prompt:        # the prompt positions take their pair's prompt gradient
            prompt = (stacked["prompt_targets"] != IGNORE_INDEX).to(d_seq.dtype)
            d_prompt = torch.cat([d_seq[n_rows:], torch.zeros_like(d_seq[n_rows:])])
            d_rows = d_rows * (1 - prompt) + d_prompt[:, None] * prompt
        self.model.logprobs_backward(d_rows, saved)

    def _host_view(self, batch: dict) -> dict:
        """The CPU-side batch the model reads: a padded pair stacked (with the chosen
        prompts' targets when the loss needs them); a packed batch without the prompt
        scores when it does not (they are not sent to the device)."""
        if not _packed(batch):
            host = _stack_pair(batch)
            return _with_prompt_targets(host) if self.with_prompt else host
        if self.with_prompt:
            return batch
        return {k: v for k, v in batch.items() if k not in pair_rows.PROMPT_SCORE_KEYS}

    def stack_batch(self, batch: dict) -> dict:
        """The chosen rows then the rejected rows, on the model's device (a packed
        batch as it is)."""
        return batch_to_device(self._host_view(batch), self.model.device)

    def _stacked(self, batch: dict):
        """(stacked batch on the device, its CPU-side copy, the facts read from that);
        a packed batch (data/dpo_pack.py) is its own stacked form."""
        host = self._host_view(batch)
        if _packed(batch):
            facts = pair_rows.packed_facts(host, self.model.config.vocab_size, self.with_prompt)
        else:
            facts = _facts(self.model, host)
        return batch_to_device(host, self.model.device), host, facts

    def reference_logps(self, stacked: dict, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        self.reference_passes += 1
        if self.with_prompt:        # the facts count the prompt scores the reference does not read
            facts = None
        with torch.no_grad(), self._reference_mode():
            seq, _ = self._sequence_logps(stacked, False, facts)
        return seq

    def _reference_for(self, batch: dict, stacked: dict, facts: BatchFacts) -> Optional[torch.Tensor]:
        if not self.loss.needs_reference:
            return None
        if self.reference_store is None:
            return self.reference_logps(stacked, facts)
        if INDEX_KEY not in batch:
            raise ValueError(f"precomputed reference log-probs need batches with {INDEX_KEY!r} "
                             "(reference_logprobs.indexed_dpo_batches)")
        return to_device(self.reference_store.lookup(batch[INDEX_KEY]), self.model.device)

    def _logps(self, seq: torch.Tensor, stacked: dict):
        """The policy's PreferenceLogps (a SequenceLogps with the chosen sequences'
        NLL sums and counts when the loss needs them) from the per-sequence sums."""
        n_tokens = _completion_tokens(stacked)
        n = n_tokens.shape[0] // 2
        pc, pr, tc, tr = seq[:n], seq[n:2 * n], n_tokens[:n], n_tokens[n:]
        if not self.with_prompt:
            return PreferenceLogps(pc, pr, tc, tr)
        return SequenceLogps(pc, pr, tc, tr, chosen_nll_logps=pc + seq[2 * n:],
                             chosen_nll_tokens=tc + _prompt_tokens(stacked, n))

    def _reference(self, ref: Optional[torch.Tensor], stacked: dict) -> Optional[PreferenceLogps]:
        if ref is None:
            return None
        n_tokens = _completion_tokens(stacked)
        return PreferenceLogps(*ref.chunk(2), *n_tokens.chunk(2))

    def micro_step(self, batch, grad_scale: float) -> Dict[str, object]:
        stacked, host, facts = self._stacked(batch)
        n_pairs = self.units(batch)
        ref = self._reference_for(batch, stacked, facts)
        seq, saved = self._sequence_logps(stacked, True, facts, self.with_prompt)
        policy_seq = seq.detach().requires_grad_()
        # a NaN loss is not looked at here (a host read): its gradients are NaN too,
        # and the trainer checks the step's loss and gradient norm before any update
        loss, metrics = self.loss.function(self._logps(policy_seq, stacked),
                                           self._reference(ref, stacked), self.options)
        loss_sum = loss * n_pairs
        (d_seq,) = torch.autograd.grad(loss_sum, policy_seq)
        self._backward(stacked, d_seq * grad_scale, saved)
        sums: Dict[str, object] = {k: v.detach().double() * n_pairs for k, v in metrics.items()}
        computed = host["input_ids"].numel()
        # per pair once the trainer divides by the pairs: what this layout computed and
        # what the padded layout would have (a run reports both)
        sums.update(loss=loss_sum.detach(), tokens=_real_tokens(host), computed=computed,
                    **{"positions/computed": computed, "positions/padded": _padded_positions(host)})
        return sums

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        totals: Dict[str, float] = {}
        pairs = 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                stacked, _, facts = self._stacked(batch)
                ref = self._reference_for(batch, stacked, facts)
                seq, _ = self._sequence_logps(stacked, False, facts, self.with_prompt)
                loss, metrics = self.loss.function(self._logps(seq, stacked),
                                                   self._reference(ref, stacked), self.options)
                n = self.units(batch)
                pairs += n
                # sums stay on the device in float64 until the one read below
                totals["eval_loss"] = totals.get("eval_loss", 0.0) + loss.double() * n
                for k, v in metrics.items():
                    totals[f"eval_{k}"] = totals.get(f"eval_{k}", 0.0) + v.double() * n
        finally:
            self.model.train(was_training)
        return {k: v / max(pairs, 1) for k, v in read_floats(totals).items()}


def _packed(batch: dict) -> bool:
    return "score_index" in batch       # data/dpo_pack.py's batches


def _completion_tokens(stacked: dict) -> torch.Tensor:
    if _packed(stacked):
        return stacked["completion_tokens"]
    counted = stacked["targets"] != IGNORE_INDEX
    if "prompt_targets" in stacked:
        counted = counted & (stacked["prompt_targets"] == IGNORE_INDEX)
    return counted.sum(dim=1)


def _prompt_tokens(stacked: dict, n: int) -> torch.Tensor:
    """The prompt tokens each pair's chosen NLL scores (prompt length - 1)."""
    if _packed(stacked):
        counts = torch.zeros(n, dtype=torch.int64, device=stacked["prompt_score_pair"].device)
        return counts.index_add_(0, stacked["prompt_score_pair"],
                                 torch.ones_like(stacked["prompt_score_pair"]))
    return (stacked["prompt_targets"][:n] != IGNORE_INDEX).sum(dim=1)


def _padded_positions(host: dict) -> int:
    """Positions the padded layout computes for this batch (the packed one records
    it, so that a run reports both side by side)."""
    if _packed(host):
        return int(host["padded_positions"])
    return host["input_ids"].numel()
