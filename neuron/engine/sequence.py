"""One request's state from waiting to finished, and how it wants its tokens picked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from neuron.engine.draft import Backoff, PromptLookup
    from neuron.engine.output import Chunk, TokenLogprob
    from neuron.engine.tools import CallReader

# Finish reasons. EXPIRED: dropped while still waiting for a batch slot (never sent to a
# client: the call fails with the queue timeout instead).
STOP, LENGTH, CANCELLED, ERROR, EXPIRED = "stop", "length", "cancelled", "error", "queue_timeout"
TOOL_CALLS = "tool_calls"  # a STOP after the answer made tool calls


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # A compiled grammar the answer must follow (``Grammars``), and what kind it is.
    grammar: Any = None
    constraint: str = ""
    # Read tool calls out of the answer (``tools.CallReader``).
    tool_calls: bool = False
    # The tokens of an answer's beginning written before (a continuation): at the end of the
    # prompt, and part of the answer for presence and frequency penalties.
    continued: tuple[int, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One request's state from waiting to finished."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Takes a chunk on the asyncio loop's thread (the worker posts them there, see Output.flush).
    sink: Callable[[Chunk], None]
    loop: asyncio.AbstractEventLoop
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded completion so far
    emitted: int = 0  # characters of text already sent
    unsent_tokens: int = 0  # tokens generated since the last chunk
    prefix_offset: int = 0  # incremental detokenisation window
    read_offset: int = 0
    generator: torch.Generator | None = None
    matcher: Any = None  # the grammar's state, where the answer is constrained
    reader: CallReader | None = None  # where tool calls are read out of the text
    lookup: PromptLookup | None = None  # its n-grams, where its tokens are drafted
    backoff: Backoff | None = None  # how its drafts fared, where its tokens are drafted
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the prefix cache held
    stop_sequence: str = ""  # the stop string that ended it, if one did
    arrived_at: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    # Set from the asyncio side: the client is gone, nothing more is sent.
    cancelled: bool = False
    # Set by the neuron (drain past its bound): end with finish reason "cancelled".
    aborted: bool = False
    finished: bool = False

    @property
    def leaving(self) -> bool:
        """Whether the sequence is to be dropped before its next step."""
        return self.cancelled or self.aborted
