"""Picking each row's next token from its logits: penalties, bias, grammar masks, temperature,
top-k and top-p, and the log probabilities a client asked for.

Rows are independent: each follows its own sequence's parameters (greedy where the
temperature is 0, else sampled with its own seeded generator), so a row's choice never
depends on which other requests share its batch. Rows with nothing to change pay nothing:
penalties, bias and masks touch only the rows that asked for them. Log probabilities are of
the model's own distribution (the log-softmax of its logits, before any of those changes), as
OpenAI's are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from neuron import metrics
from neuron.engine import grammar
from neuron.engine.sequence import Sequence


@dataclass
class Logprob:
    """A chosen token's log probability and the most likely tokens at its step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sampled:
    tokens: torch.Tensor  # [rows]: each row's new token (the next step runs it)
    logprobs: list[Logprob | None]  # per row, where asked for
    failed: dict[int, str] = field(default_factory=dict)  # rows that could not be sampled
    # A verifying step's: per row, the draft tokens kept, which come before its new token.
    accepted: list[list[int]] = field(default_factory=list)


class Sampler:
    """Chooses one token per row of a step's logits."""

    def __init__(self, model_id: str) -> None:
        self._labels = {"model": model_id}

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
        logits = logits.float()
        raw = logits.clone() if any(s.params.logprobs for s in seqs) else logits
        for i, seq in enumerate(seqs):
            _penalise(logits, i, seq)
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            self._mask(logits, constrained, seqs)
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            if seq.params.temperature == 0:
                continue
            probs = _distribution(logits[i], seq)
            tokens[i] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        chosen = tokens.tolist()
        for i in constrained:
            # The grammar advances only on the token really sampled.
            seqs[i].matcher.accept_token(chosen[i])
        return Sampled(tokens, [_logprob(raw, i, s, chosen[i]) for i, s in enumerate(seqs)])

    def verify(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
    ) -> Sampled:
        """A verifying step's choices: ``logits`` [rows, n, vocab] are those of each row's
        last token and then of its draft tokens (``drafts``, none for most rows).

        A row's draft tokens are kept while the model agrees, and its new token is the
        model's own at the first disagreement (or after the whole draft), so each row's
        tokens follow the distribution plain decoding gives. Greedy: kept while each is the
        argmax. Sampled (the draft is one token for certain, not a distribution): draft
        token ``d`` is kept with probability ``p(d)``; on a rejection the new token is drawn
        from ``p`` without ``d`` (renormalised); with all kept, from the next position's
        ``p``. Then a token comes out as ``p(d) + (1 - p(d)) * 0`` for ``d`` and
        ``(1 - p(d)) * p(x) / (1 - p(d)) = p(x)`` for any other ``x``: exactly ``p``.
        Rows with no draft are sampled as in a plain step (from their first column).
        """
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        logprobs: list[Logprob | None] = [None] * len(seqs)
        accepted: list[list[int]] = [[] for _ in seqs]
        plain = [i for i, d in enumerate(drafts) if not d]
        if plain:
            one = self.sample(logits[plain, 0], [seqs[i] for i in plain])
            tokens[plain] = one.tokens
            for i, logprob in zip(plain, one.logprobs, strict=True):
                logprobs[i] = logprob
        for i, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            if not draft:
                continue
            # Drafted rows have no penalties, bias or grammar (``draft.draftable``).
            columns = logits[i, : len(draft) + 1].float()
            if seq.params.temperature == 0:
                choices = columns.argmax(dim=-1).tolist()
                kept = 0
                while kept < len(draft) and choices[kept] == draft[kept]:
                    kept += 1
                token = choices[kept]
            else:
                kept, token = _speculate(_distribution(columns, seq), draft, seq)
            accepted[i] = draft[:kept]
            tokens[i] = token
        return Sampled(tokens, logprobs, accepted=accepted)

    def _mask(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
        started = time.perf_counter()
        allowed = grammar.allowed([seqs[i].matcher for i in rows], logits.shape[-1])
        index = torch.tensor(rows, device=logits.device)
        masked = logits.index_select(0, index).masked_fill(~allowed.to(logits.device), -torch.inf)
        logits.index_copy_(0, index, masked)
        metrics.MASK_SECONDS.labels(**self._labels).observe(time.perf_counter() - started)


def _distribution(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The probabilities ``seq`` samples from, [..., vocab]: its temperature, top-k, top-p."""
    p = seq.params
    row = logits / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[..., -1:]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p
        row = row.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.softmax(row, dim=-1)


def _speculate(probs: torch.Tensor, draft: list[int], seq: Sequence) -> tuple[int, int]:
    """Sampled verification (see ``Sampler.verify``) of ``draft`` against ``probs``
    [len(draft) + 1, vocab]: how many draft tokens are kept, and the new token."""
    k = len(draft)
    chance = probs[torch.arange(k, device=probs.device), torch.tensor(draft, device=probs.device)]
    draws = torch.rand(k, generator=seq.generator, device=probs.device)
    rejected = (draws >= chance).nonzero()
    if not rejected.numel():
        return k, int(torch.multinomial(probs[k], 1, generator=seq.generator)[0])
    kept = int(rejected[0])
    rest = probs[kept].clone()
    rest[draft[kept]] = 0  # multinomial renormalises
    return kept, int(torch.multinomial(rest, 1, generator=seq.generator)[0])


def _penalise(logits: torch.Tensor, i: int, seq: Sequence) -> None:
    """Repetition, presence and frequency penalties and the logit bias, on row ``i``."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids + seq.generated)), device=logits.device)
        scores = logits[i, seen]
        logits[i, seen] = torch.where(
            scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty
        )
    answer = [*p.continued, *seq.generated] if p.continued else seq.generated
    if (p.presence_penalty or p.frequency_penalty) and answer:
        # OpenAI's: over the tokens of the answer so far (a continued one's too), not the prompt.
        ids, counts = torch.tensor(answer, device=logits.device).unique(return_counts=True)
        logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
        logits[i, ids] += torch.tensor([b for _, b in p.logit_bias], device=logits.device)


def _logprob(raw: torch.Tensor, i: int, seq: Sequence, token: int) -> Logprob | None:
    if not seq.params.logprobs:
        return None
    row = torch.log_softmax(raw[i], dim=-1)
    top: list[tuple[int, float]] = []
    if seq.params.top_logprobs:
        values, ids = torch.topk(row, seq.params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return Logprob(token, float(row[token]), top)
