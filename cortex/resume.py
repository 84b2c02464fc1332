"""Streams that survive their neuron: a generation whose neuron fails mid-way goes on from
where it was on another neuron.

``Resumable`` stands in for the router's ``Stream`` and keeps what the generation has
produced: the text handed on and the tokens counted. When the neuron fails after the first
message (its call broken or gone, ``UNAVAILABLE``, ``INTERNAL``, ``UNKNOWN``; or it cancelled
the generation as its drain ran past its bound), ``resume`` opens the same request on another
neuron with that text as its ``continuation`` (a chat's assistant turn left open; a raw
prompt's text goes on after it), asking for what is left of ``max_tokens``, with the same
seed. The messages of every part then read as one generation's: the prompt counted once (the
first part's), the completion's tokens of all parts, the finish of the last.

Not resumed: answers held to tools or an output constraint (the grammar and the call reader
would need the answer so far replayed through them), a generation past ``timeouts.request``
or one cortex cut itself (its drain), and after a neuron broke on the request (``INTERNAL``,
``UNKNOWN``) a second time, as the router retries such a request on one other neuron only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from cortex import metrics
from cortex.errors import CortexError, NeuronFailed
from cortex.router import Router, Stream
from helexa.neuron.v1 import neuron_pb2 as pb

log = logging.getLogger(__name__)

# Mid-stream failures another neuron may not share: the neuron, or the way to it, is gone.
_RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
_BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def resumable_request(request: pb.GenerateRequest) -> bool:
    """Whether a generation of ``request`` can go on from its text alone: no tools offered
    (or tool_choice none) and no output constraint."""
    if request.output.WhichOneof("kind") is not None:
        return False
    return not request.tools or request.tool_choice.mode == pb.TOOL_CHOICE_MODE_NONE


class Resumable:
    """A generation that goes on on another neuron when its own fails mid-way: ``take``,
    ``wait``, ``cut`` and ``close`` as a ``Stream``; after a failure ``resumable`` says
    whether ``resume`` may try."""

    __slots__ = (
        "_before", "_cut", "_param", "_pending", "_router", "_text", "broken", "cached_tokens",
        "enabled", "failed", "model_id", "prompt_tokens", "request", "stream", "tokens",
    )  # fmt: skip

    def __init__(
        self,
        router: Router,
        model_id: str,
        request: pb.GenerateRequest,
        stream: Stream,
        param: Callable[[str], str] | None = None,
    ) -> None:
        self._router = router
        self.model_id = model_id
        self.request = request
        self.stream = stream
        self._param = param
        self.enabled = router.config.routing.resume_streams and resumable_request(request)
        self._text: list[str] = []
        self.tokens = 0  # completion tokens so far, of every part
        self._before = 0  # of those, the ones earlier parts produced
        self.prompt_tokens = self.cached_tokens = 0  # the first part's
        self.failed: set[str] = {stream.neuron.name}  # neurons this generation failed on
        self.broken = False  # a neuron broke on it (INTERNAL, UNKNOWN)
        self._pending: CortexError | None = None  # the failure the next take raises
        self._cut: CortexError | None = None

    @property
    def text(self) -> str:
        """The text handed on so far, of every part."""
        return "".join(self._text)

    def take(self) -> list[pb.GenerateResponse]:
        """What came since the last take, as one generation's messages; ``NeuronFailed`` once
        the generation failed (``resumable`` then says whether it may go on)."""
        if self._pending is not None:
            raise self._pending
        messages = self.stream.take()
        if not messages:
            return messages
        last = messages[-1]
        if last.finish_reason == pb.FINISH_REASON_CANCELLED:  # the neuron's drain past its bound
            self._pending = NeuronFailed(
                f"neuron {self.stream.neuron.name} cancelled the generation (it is shutting down)"
            )
            last.finish_reason = pb.FINISH_REASON_UNSPECIFIED
            if not (last.text or last.tokens or last.tool_calls or last.logprobs):
                messages.pop()
        if not self.enabled:  # nothing to go on from: the text and counts are not kept
            return messages
        first = not self._text and not self.tokens and not self.prompt_tokens
        for message in messages:
            if first:
                self.prompt_tokens = message.usage.prompt_tokens
                self.cached_tokens = message.usage.cached_prompt_tokens
                first = False
            self._text.append(message.text)
            self.tokens += message.tokens
            if message.finish_reason and self._before:
                # The prompt counted once (the first part's), the completion of every part.
                message.usage.prompt_tokens = self.prompt_tokens
                message.usage.cached_prompt_tokens = self.cached_tokens
                message.usage.completion_tokens += self._before
        return messages

    async def wait(self, until: float) -> bool:
        """Wait for something to take: False if the loop's clock reached ``until`` first."""
        if self._pending is not None:
            return True
        return await self.stream.wait(until)

    def cut(self, error: CortexError) -> None:
        """End the stream here with ``error`` (cortex's drain past its bound); never resumed."""
        self._cut = error
        self.stream.cut(error)

    def close(self) -> None:
        self.stream.close()

    def resumable(self) -> bool:
        """Whether the failure ``take`` raised may be resumed on another neuron."""
        if self._cut is not None:
            return False
        code = self.stream.failure
        if self._pending is None and code not in _RESUMABLE:
            return False  # a deadline, a bound, cortex's own cancel: not the neuron's failure
        if not self.enabled:
            metrics.RESUMPTIONS.labels(result="not_resumable").inc()
            return False
        return not (code in _BROKEN and self.broken)

    async def resume(self) -> None:
        """Go on with the generation on another neuron, once its first message is there; the
        router's ``CortexError`` when none can take it."""
        failed = self.stream
        failed.close()
        self.broken = self.broken or failed.failure in _BROKEN
        self._pending = None
        request = self.continuation()
        try:
            stream = await self._router.open(
                self.model_id, request, self._param, exclude=frozenset(self.failed)
            )
        except CortexError as e:
            metrics.RESUMPTIONS.labels(result="failed").inc()
            log.warning(
                "resuming failed request_id=%s model=%s neuron=%s error=%s",
                request.request_id, self.model_id, failed.neuron.name, e.message,
            )  # fmt: skip
            raise
        if self._cut is not None:  # cortex's drain cut the stream meanwhile
            stream.close()
            raise self._cut
        metrics.RESUMPTIONS.labels(result="resumed").inc()
        log.info(
            "resumed request_id=%s model=%s from=%s on=%s tokens=%d",
            request.request_id, self.model_id, failed.neuron.name, stream.neuron.name,
            self.tokens,
        )  # fmt: skip
        self.failed.add(stream.neuron.name)
        self._before = self.tokens
        self.stream = stream

    def continuation(self) -> pb.GenerateRequest:
        """The request that goes on from the text so far: the same input and sampling (the
        seed too), that text as the answer's beginning, and what is left of max_tokens."""
        request = pb.GenerateRequest()
        request.CopyFrom(self.request)
        request.continuation = self.text
        if request.HasField("max_tokens"):
            # At least 1: a neuron that failed as its last token came leaves one to write.
            request.max_tokens = max(1, request.max_tokens - self.tokens)
        elif request.max_tokens_limit:
            request.max_tokens_limit = max(1, request.max_tokens_limit - self.tokens)
        return request
