"""Picking each row's next token from its logits: penalties, temperature, top-k and top-p.

Rows are independent: each follows its own sequence's parameters (greedy where the
temperature is 0, else sampled with its own seeded generator), so a row's choice never
depends on which other requests share its batch.
"""

from __future__ import annotations

import torch

from neuron.engine.sequence import Sequence


class Sampler:
    """Chooses one token per row of a step's logits."""

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Pick one token per row: greedy where temperature is 0, else seeded sampling."""
        logits = logits.float()
        for i, seq in enumerate(seqs):
            penalty = seq.params.repetition_penalty
            if penalty != 1.0:
                seen = torch.tensor(
                    sorted(set(seq.prompt_ids + seq.generated)), device=logits.device
                )
                scores = logits[i, seen]
                logits[i, seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                continue
            row = logits[i] / p.temperature
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                drop = probs.cumsum(-1) - probs > p.top_p
                row = row.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(row, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        return tokens
