"""``GenerateMany``: many generations over one long-lived gRPC call, for a gateway.

A call is a session. A task reads the caller's messages, starts a task per generation and
cancels the ones the caller names; generations put their events in the session's outbox, and
the call's response stream sends all that is there as one message each time it can, so under
load one message carries many generations' events. Each generation is the one a ``Generate``
call would run (the servicer hands the same function to both), and its failure becomes an
error event with the status ``Generate`` would have ended with.

Nothing here touches torch: the gateway bench's stand-in neuron serves ``GenerateMany`` with it
too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from helexa.neuron.v1 import neuron_pb2 as pb

# One generation: the messages a Generate call would stream, or the exception it would end with.
Generation = Callable[[pb.GenerateRequest], AsyncGenerator[pb.GenerateResponse, None]]
# The status a Generate call would end with for an exception of its generation.
Status = Callable[[Exception], tuple[grpc.StatusCode, str]]


class _Misuse(Exception):
    """The caller broke the call's contract (an id reused while running): the call ends."""


class _Session:
    """One GenerateMany call: its generations by id and the events not yet sent.

    A generation's messages that queue while the call is writing are merged into one event,
    as a Generate call's are while its caller reads: a message per token costs more than the
    token, and nobody is waiting on the parts.
    """

    def __init__(self) -> None:
        self.outbox: list[pb.GenerateEvent] = []
        self.wake = asyncio.Event()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._unsent: dict[int, pb.GenerateResponse] = {}  # each id's response in the outbox

    def send(self, event: pb.GenerateEvent) -> None:
        self.outbox.append(event)
        self.wake.set()

    def send_response(self, id: int, response: pb.GenerateResponse) -> None:
        unsent = self._unsent.get(id)
        if unsent is None:
            event = pb.GenerateEvent(id=id, response=response)
            self._unsent[id] = event.response
            self.send(event)
            return
        unsent.text += response.text
        unsent.tokens += response.tokens
        unsent.tool_calls.extend(response.tool_calls)
        unsent.logprobs.extend(response.logprobs)
        if response.finish_reason:
            unsent.finish_reason = response.finish_reason
            unsent.usage.CopyFrom(response.usage)
            unsent.stop_sequence = response.stop_sequence

    def take(self) -> pb.GenerateManyResponse:
        """Everything in the outbox, as one message."""
        events, self.outbox = self.outbox, []
        self._unsent.clear()
        return pb.GenerateManyResponse(events=events)


class Multiplexer:
    """Serves GenerateMany calls with ``generate``; ``drain`` ends them once they are idle."""

    def __init__(self, generate: Generation, status: Status) -> None:
        self._generate = generate
        self._status = status
        self._sessions: set[_Session] = set()
        self.draining = False

    def drain(self) -> None:
        """From now on, each call ends as soon as none of its generations runs."""
        self.draining = True
        for session in self._sessions:
            session.wake.set()

    async def serve(
        self, requests: AsyncIterator[pb.GenerateManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.GenerateManyResponse, None]:
        await context.send_initial_metadata(())
        session = _Session()
        self._sessions.add(session)
        reader = asyncio.create_task(self._read(requests, session))
        try:
            while True:
                await session.wake.wait()
                session.wake.clear()
                if session.outbox:
                    yield session.take()
                if reader.done() and not reader.cancelled() and (error := reader.exception()):
                    if isinstance(error, _Misuse):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                    raise error
                if not session.tasks and not session.outbox and (self.draining or reader.done()):
                    return
        finally:
            self._sessions.discard(session)
            tasks = [reader, *session.tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(
        self, requests: AsyncIterator[pb.GenerateManyRequest], session: _Session
    ) -> None:
        try:
            async for message in requests:
                for start in message.start:
                    if start.id in session.tasks:
                        raise _Misuse(f"start: id {start.id} is already running in this call")
                    session.send(pb.GenerateEvent(id=start.id, accepted=True))
                    session.tasks[start.id] = asyncio.create_task(
                        self._run(session, start.id, start.request)
                    )
                for cancelled in message.cancel:
                    task = session.tasks.get(cancelled)
                    if task is not None:
                        task.cancel()
        finally:
            session.wake.set()

    async def _run(self, session: _Session, id: int, request: pb.GenerateRequest) -> None:
        try:
            async with contextlib.aclosing(self._generate(request)) as responses:
                async for response in responses:
                    session.send_response(id, response)
        except Exception as e:
            code, message = self._status(e)
            error = pb.GenerateError(code=code.value[0], message=message)
            session.send(pb.GenerateEvent(id=id, error=error))
        finally:
            del session.tasks[id]
            session.wake.set()
