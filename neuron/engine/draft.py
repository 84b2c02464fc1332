"""Draft tokens for speculative decoding by prompt lookup: guesses without a draft model.

An answer that repeats its input (a code edit, an extraction, an agent quoting a file) can be
guessed from that input: find the most recent earlier place in the row's tokens (prompt and
answer so far) where its last n tokens stood, and propose the tokens that followed there
(vLLM's ``ngram`` method, transformers' ``prompt_lookup_num_tokens``). The engine then runs
each row's last token and its draft in one step and keeps what the model agrees with
(``Sampler.verify``), so a good guess yields several tokens for about the price of one step
and a bad one costs only the extra columns it ran.
"""

from __future__ import annotations

from neuron.engine.sequence import Sequence

# Longest and shortest n-gram looked up; a longer match is tried first (it predicts better).
# Not single tokens: on chat answers they matched often and were rarely right (drafts kept
# 0.10 against 0.25 from 2, and one stream ran at 0.70x plain speed against 0.99x; BENCHMARKS.md 8).
MAX_NGRAM = 3
MIN_NGRAM = 2

# Back-off of a row whose drafts keep failing (chat answers kept 0.25 of their draft tokens,
# and each drafting row widens the whole batch's step; BENCHMARKS.md 8). A row's acceptance
# is an average over its recent drafts, the newest weighing RECENT. Under MIN_ACCEPTANCE (a
# draft of 4 keeping about one token, which does not pay for its wider step) the row drafts
# nothing for FIRST_PAUSE steps, twice as many after each further failure, up to MAX_PAUSE;
# a draft kept at least half resets the pause.
RECENT = 0.5
MIN_ACCEPTANCE = 0.3
FIRST_PAUSE = 4
MAX_PAUSE = 64


def draftable(seq: Sequence) -> bool:
    """Whether ``seq``'s tokens may be drafted. Not drafted (they decode a token a step):
    rows under a grammar (its matcher would have to be rolled back on a rejection), rows
    that want log probabilities, and rows with penalties or a logit bias (their distribution
    at each drafted position depends on the tokens before it)."""
    p = seq.params
    return not (
        seq.matcher is not None
        or p.logprobs
        or p.logit_bias
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
    )


class Backoff:
    """One row's recent acceptance of its drafts, and the steps it waits before it drafts
    again after they kept failing."""

    def __init__(self) -> None:
        self.acceptance = 1.0  # a new row may draft
        self.pause = FIRST_PAUSE  # steps of its next wait
        self.waiting = 0  # steps left of its current wait

    def ready(self) -> bool:
        """Whether the row may draft this step (called once a step; counts its wait down)."""
        if self.waiting:
            self.waiting -= 1
            return False
        return True

    def record(self, drafted: int, kept: int) -> None:
        """A verifying step kept ``kept`` of the row's ``drafted`` draft tokens."""
        rate = kept / drafted
        self.acceptance = (1 - RECENT) * self.acceptance + RECENT * rate
        if rate >= 0.5:
            self.pause = FIRST_PAUSE
        if self.acceptance < MIN_ACCEPTANCE:
            self.waiting = self.pause
            self.pause = min(2 * self.pause, MAX_PAUSE)
            # On probation after the wait: a draft that keeps nothing waits again.
            self.acceptance = 0.5


class PromptLookup:
    """One row's n-grams and where each last stood, kept up to date as its tokens grow, so
    a step's lookup is a dictionary read, not a scan of the whole context."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        # n-gram -> where the token after its most recent occurrence stands
        self._after: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in ``_after``

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the last n
        tokens of ``tokens`` (n from ``max_ngram`` down to ``min_ngram``); none if none did.
        ``tokens`` only ever grows between calls (a row's prompt and answer so far)."""
        # Index the n-grams that end before the last token: each has a token after it.
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self._after[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(tokens) - 1)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            at = self._after.get(tuple(tokens[len(tokens) - n :]))
            if at is not None:
                return tokens[at : at + k]
        return []
