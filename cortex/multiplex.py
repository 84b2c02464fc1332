"""Every generation cortex asks of a neuron goes over one long-lived ``GenerateMany`` call.

A gRPC call per request costs a Python gateway more than the request's own work when answers
are short (a bare aiohttp -> grpc.aio relay tops out near 3,000 calls/s on one core). So each
neuron has one ``GenerateMany`` call, opened on first use and again after it ends. A writer task
sends the starts and cancels queued since its last write as one message; a reader task hands
each event to its generation. Under load, a message each way carries many requests.

Each ``Generation`` behaves as a ``Generate`` call did: ``accepted`` once the neuron took it (its
headers, before), ``take`` for its messages (all that came since the last take, so a reader
that is behind gets them together), ``Failed`` with the status a call would have ended
with, ``cancel`` to stop it on the neuron. When the call itself fails or ends, every generation
on it fails with that status (UNAVAILABLE when the neuron ended it, as a draining one does), so
the router retries them elsewhere before their first message, exactly as for a failed call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable

import grpc

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# A message of starts and cancels stays below this many bytes, a quarter of what a neuron
# takes (64 MiB), so a burst of large prompts never makes one message a neuron refuses (and
# the call break); one request alone is bounded by limits.max_body, at most this.
MESSAGE_BYTES = 16 << 20
# Messages a generation holds that nobody has taken; past it the generation stops (its reader
# is gone or stuck: a client's writes are bounded by timeouts.write, so this is a backstop).
MAX_BUFFERED = 1 << 16
# A call that ended with these: the neuron (or the way to it) is gone, not the call broken.
_NEURON_GONE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class Failed(Exception):
    """A generation ended with a gRPC status instead of its last message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Generation:
    """One request's generation on a neuron: ``accepted``, ``started``, then ``take`` what came
    and ``wait`` for more until the message with a finish reason.

    Waiting costs no timer per message: one alarm per generation rings at the earliest
    deadline a wait asked for, and a wait that asks for a later one only moves it when it
    rings (a stream's deadline moves with every token; it rarely comes).
    """

    __slots__ = (
        "_accepted", "_alarm", "_alarm_at", "_call", "_failure", "_id", "_loop", "_messages",
        "_over", "_timer", "_until", "_waiter", "request", "resent",
    )  # fmt: skip

    def __init__(self, call: _Call, id: int, timeout: float, request: pb.GenerateRequest) -> None:
        self._call = call
        self._id = id
        # Kept until the first message, to send again if the call breaks before it.
        self.request: pb.GenerateRequest | None = request
        self.resent = False
        self._loop = asyncio.get_running_loop()  # asked once: each ask is a getpid() on 3.11
        self._messages: deque[pb.GenerateResponse] = deque()
        self._failure: Failed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._accepted = False
        self._over = False  # nothing more will arrive: the last message, or a failure
        # The alarm and when it rings (kept here: uvloop's call_at of a time already past
        # gives a plain Handle, which has no ``when``).
        self._alarm: asyncio.Handle | None = None
        self._alarm_at = 0.0
        self._until = 0.0
        self._timer = self._loop.call_later(timeout, self._expire, timeout)

    async def accepted(self) -> None:
        """Return once the neuron has taken the request; ``Failed`` if it failed first."""
        await self._reach(lambda: self._accepted or bool(self._messages))

    async def started(self) -> None:
        """Return once the first message is there to take; ``Failed`` if it failed first."""
        await self._reach(lambda: bool(self._messages))

    def take(self) -> list[pb.GenerateResponse]:
        """The messages that came since the last take, oldest first; once they are all taken,
        ``Failed`` if the generation failed."""
        if self._messages:
            messages = list(self._messages)
            self._messages.clear()
            return messages
        if self._failure is not None:
            raise self._failure
        return []

    async def wait(self, until: float) -> bool:
        """Wait for something to ``take``: False if the loop's clock reached ``until`` first."""
        if self._messages or self._over:
            return True
        self._until = until
        if self._alarm is None or self._alarm_at > until:
            if self._alarm is not None:
                self._alarm.cancel()
            self._alarm, self._alarm_at = self._loop.call_at(until, self._ring), until
        await self._wait()
        return bool(self._messages) or self._over

    def cancel(self) -> None:
        """Stop the generation on the neuron; a no-op once it has ended."""
        self._stop(Failed(grpc.StatusCode.CANCELLED, "cortex cancelled the generation"))

    def _stop(self, failure: Failed) -> None:
        """End the generation here with ``failure`` and send the neuron its cancel."""
        if not self._over:
            self.fail(failure)
            self._call.cancel(self._id)

    async def _reach(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``; ``Failed`` if the generation failed before."""
        while not (ready() or self._over):
            await self._wait()
        if not ready() and self._failure is not None:
            raise self._failure

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _ring(self) -> None:
        self._alarm = None
        if self._waiter is None:
            return
        if self._loop.time() < self._until:  # a later deadline since it was set
            self._alarm, self._alarm_at = self._loop.call_at(self._until, self._ring), self._until
        else:
            self._wake()

    def _end(self) -> None:
        self._over = True
        self._timer.cancel()
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._call.generations.pop(self._id, None)
        if self._call.alone:
            self._call.finish()

    def deliver(self, event: pb.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "accepted":
            self._accepted = True
        elif kind == "response":
            self.request = None
            if len(self._messages) >= MAX_BUFFERED:  # nobody takes them: a bound on memory
                self._stop(Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "nobody reads the answer"))
                return
            self._messages.append(event.response)
            if event.response.finish_reason:
                self._end()
        else:
            code = _CODES.get(event.error.code, grpc.StatusCode.UNKNOWN)
            self.fail(Failed(code, event.error.message))
        self._wake()

    def fail(self, failure: Failed) -> None:
        if not self._over:
            self._failure = failure
            self._end()
            self._wake()

    def move(self, call: _Call, id: int) -> None:
        """Go on over ``call`` under ``id`` (its old call broke before its first message)."""
        self._call, self._id, self.resent = call, id, True
        self._accepted = False

    def _expire(self, timeout: float) -> None:
        self._stop(Failed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end within {timeout:g} s"))


class _Call:
    """One GenerateMany call and the generations on it."""

    def __init__(
        self,
        stub: pb_grpc.NeuronStub,
        ended: Callable[[_Call, list[Generation]], None],
        alone: bool = False,
    ) -> None:
        self.generations: dict[int, Generation] = {}
        # A call of its own for one generation sent again: it ends with that generation.
        self.alone = alone
        self._finishing = False
        # What to write next: the starts and cancels queued since the last write.
        self._outgoing = pb.GenerateManyRequest()
        self._wake = asyncio.Event()
        self._over = False
        self._rpc = stub.GenerateMany()
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read(ended))

    def start(self, id: int, request: pb.GenerateRequest, timeout: float) -> Generation:
        generation = Generation(self, id, timeout, request)
        self.send(generation, id)
        return generation

    def send(self, generation: Generation, id: int) -> None:
        """Queue ``generation``'s start under ``id``."""
        assert generation.request is not None
        self.generations[id] = generation
        self._outgoing.start.add(id=id, request=generation.request)
        self._wake.set()

    def cancel(self, id: int) -> None:
        if not self._over:
            self._outgoing.cancel.append(id)
            self._wake.set()

    def finish(self) -> None:
        """Close the sending side once what is queued is written (the neuron then ends the
        call once its generations have)."""
        self._finishing = True
        self._wake.set()

    async def close(self) -> None:
        self._rpc.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                message, self._outgoing = self._outgoing, pb.GenerateManyRequest()
                for part in _below_limit(message):
                    await self._rpc.write(part)
                if self._finishing:
                    await self._rpc.done_writing()
                    return
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call is over; the reader tells its generations how

    async def _read(self, ended: Callable[[_Call, list[Generation]], None]) -> None:
        failure = Failed(grpc.StatusCode.UNAVAILABLE, "the neuron ended the GenerateMany call")
        broken = False
        try:
            while (message := await self._rpc.read()) is not grpc.aio.EOF:
                for event in message.events:
                    generation = self.generations.get(event.id)
                    if generation is not None:  # else cancelled here, or past its deadline
                        generation.deliver(event)
        except grpc.aio.AioRpcError as e:
            failure = Failed(e.code(), e.details() or "")
            broken = e.code() not in _NEURON_GONE
        except asyncio.CancelledError:
            failure = Failed(grpc.StatusCode.CANCELLED, "cortex closed the GenerateMany call")
            raise
        finally:
            self._over = True
            self._writer.cancel()
            # A call that broke while its neuron lives (a message it refused, say) fails none
            # of the generations that have had no message yet: they go again, once, each over
            # a call of its own, so the one that broke it breaks only its own. The neuron
            # cancelled them with the old call.
            again = [g for g in self.generations.values() if broken and g.request and not g.resent]
            if self.generations:
                log.info(
                    "GenerateMany call ended generations=%d sent_again=%d error=%s",
                    len(self.generations), len(again), failure,
                )  # fmt: skip
            for generation in list(self.generations.values()):
                if generation not in again:
                    generation.fail(failure)
            ended(self, again)


def _below_limit(message: pb.GenerateManyRequest) -> list[pb.GenerateManyRequest]:
    """``message`` as messages of at most ``MESSAGE_BYTES`` each (a start larger alone goes
    alone: limits.max_body keeps it below what a neuron takes). Sized only when it merges
    starts: one start is within the bound by itself."""
    if len(message.start) < 2 or message.ByteSize() <= MESSAGE_BYTES:
        return [message]
    parts = [pb.GenerateManyRequest(cancel=message.cancel)]
    size = 0
    for start in message.start:
        bytes_ = start.ByteSize() + 8  # the field's tag and length, generously
        if parts[-1].start and size + bytes_ > MESSAGE_BYTES:
            parts.append(pb.GenerateManyRequest())
            size = 0
        parts[-1].start.append(start)
        size += bytes_
    return parts


class Multiplexer:
    """The generations on one neuron, over its current GenerateMany call."""

    def __init__(self, stub: pb_grpc.NeuronStub) -> None:
        self._stub = stub
        self._call: _Call | None = None
        self._ids = itertools.count(1)
        self._closed = False

    def start(self, request: pb.GenerateRequest, timeout: float) -> Generation:
        """Send ``request`` to the neuron; its generation fails after ``timeout`` seconds."""
        return self._current().start(next(self._ids), request, timeout)

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            await self._call.close()

    def _current(self) -> _Call:
        if self._call is None:
            self._call = _Call(self._stub, self._ended)
        return self._call

    def _ended(self, call: _Call, again: list[Generation]) -> None:
        if self._call is call:
            self._call = None
        if self._closed:
            for generation in again:
                generation.fail(Failed(grpc.StatusCode.CANCELLED, "cortex closed the call"))
            return
        for generation in again:
            own = _Call(self._stub, self._ended, alone=True)
            id = next(self._ids)
            generation.move(own, id)
            own.send(generation, id)
