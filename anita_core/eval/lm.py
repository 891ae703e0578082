"""anita's own model as an lm-evaluation-harness ``LM``: the NF4 base plus an optional
LoRA adapter, the numerics the adapter was trained with.

Requests are turned into tokens exactly as lm-eval's HF model (``HFLM``) does, so the
two score the same token sequences:
- text is encoded with the tokenizer's post-processor (transformers'
  ``tokenizer.encode(text)``: LLaMA-3's adds its BOS, ChatML's adds nothing), except
  a text that already starts with the BOS, or when lm-eval asks otherwise;
- loglikelihood: lm-eval's TemplateLM splits each (context, continuation) pair
  (trailing spaces of the context go to the continuation; an empty context becomes
  the BOS, else EOS); the scored sequence is (context + continuation)[-(L + 1):][:-1]
  for L = max_length, and the answer is (sum of log p(continuation tokens), whether
  each was the argmax);
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens
  (prefix = BOS, else EOS), each scored as above, summed;
- generate_until: the context left-truncated to max_length - max_gen_toks tokens,
  continued greedily (or sampled when the request sets do_sample/temperature) by
  anita's KV-cache generation up to max_gen_toks tokens or the EOS, the text cut at
  the first "until" string.

Scoring packs many requests into one row of at most ``batch_tokens`` tokens: each
request is its own document (positions restart, attention stays inside it), so a
row's forward gives every request's log-probs as if it ran alone. Only the rows
that predict a continuation token are multiplied by the output embedding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from anita_core.model.generate import generate

DEFAULT_MAX_GEN_TOKS = 256        # lm-eval's HFLM default
DEFAULT_BATCH_TOKENS = 4096


class AnitaLM(TemplateLM):
    """lm-eval LM over a loaded QLoRALlama (adapters on it, or none) and its tokenizer."""

    def __init__(self, model, tokenizer, *, max_length: Optional[int] = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 progress: bool = True):
        super().__init__()
        if tokenizer.eos_id is None and tokenizer.bos_id is None:
            raise ValueError(f"{tokenizer.config_name}: the tokenizer has neither a bos_token nor an "
                             "eos_token, which lm-eval needs as the prefix of an empty context")
        self.model, self.tok = model.eval(), tokenizer
        self._max_length = max_length or model.config.max_position_embeddings
        self.batch_tokens = max(batch_tokens, self._max_length + 1)
        self._max_gen_toks = max_gen_toks
        self.progress = progress

    # ------------------------------------------------------------- what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.tok.bos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> List[int]:
        add = True if add_special_tokens is None else add_special_tokens
        bos = self.tok.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add = False
        ids = self.tok.backend.encode(string, add_special_tokens=add).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> List[Tuple[float, bool]]:
        """[(request key, context ids, continuation ids)] -> [(log-likelihood, is greedy)]."""
        sequences = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError("lm-eval sent a request with an empty context or continuation, "
                                 f"or a continuation over {self.max_length} tokens")
            whole = (context + continuation)[-(self.max_length + 1):]
            sequences.append((whole[:-1], whole[-len(continuation):]))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(sequences)
        bar = tqdm(total=len(sequences), desc="scoring (anita)", disable=disable_tqdm or not self.progress)
        for row in _pack(order, [len(s[0]) for s in sequences], self.batch_tokens):
            for i, answer in zip(row, self._score_row([sequences[i] for i in row])):
                results[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(row))
        bar.close()
        return results

    @torch.no_grad()
    def _score_row(self, sequences) -> List[Tuple[float, bool]]:
        """One packed row of (input ids, continuation ids): each input a document."""
        device = self.model.device
        ids = torch.tensor([t for inp, _ in sequences for t in inp], device=device)[None]
        segments = torch.cat([torch.full((len(inp),), d, device=device)
                              for d, (inp, _) in enumerate(sequences)])[None]
        positions = torch.cat([torch.arange(len(inp), device=device) for inp, _ in sequences])[None]
        hidden, _ = self.model.forward_hidden(ids, positions, segments, for_backward=False)
        rows, targets, ends = [], [], 0
        for inp, continuation in sequences:
            ends += len(inp)
            rows.append(torch.arange(ends - len(continuation), ends, device=device))
            targets += continuation
        rows = torch.cat(rows)
        logits = hidden[rows].float() @ self.model.base.output_embedding.float().t()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(targets, device=device)
        token_logp = logp.gather(1, targets[:, None])[:, 0]
        greedy = logits.argmax(-1) == targets
        out, at = [], 0
        for _, continuation in sequences:
            n = len(continuation)
            out.append((float(token_logp[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for req in tqdm(requests, desc="generating (anita)", disable=disable_tqdm or not self.progress):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            tokens = generate(self.model, [prompt], max_new, temperature=temperature,
                              top_k=kwargs.pop("top_k", None), top_p=kwargs.pop("top_p", None),
                              eos_token_ids=[self.eot_token_id], pad_token_id=self.tok.pad_id)[0]
            text = self.tok_decode([t for t in tokens if t != self.eot_token_id])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out


def _pack(order: Sequence[int], lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Consecutive requests of ``order`` in rows of at most ``budget`` tokens."""
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > budget:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    return rows + ([row] if row else [])
