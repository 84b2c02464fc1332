"""A stand-in neuron for measuring the gateway alone: it implements the helexa.neuron.v1
contract and streams tokens instantly, with no model behind it.

    .venv/bin/python -m bench.standin_neuron --listen 127.0.0.1:13131 [--tokens-per-message 1]

It holds one READY model, ``standin``. Generate streams ``max_tokens`` tokens (each the text
``"tok "``), ``tokens_per_message`` to a message, then ends with finish reason LENGTH.

With ``--tokens-per-message 0`` it sends as neuron does: tokens are produced one per event
loop turn and each message carries every token produced while the previous one was being
written (``ModelEngine.stream`` merges what queued while its reader was busy).

``GenerateMany`` (how cortex asks) is served by neuron's own ``neuron.multiplex``.

A request with ``message_interval`` set (a caller that wants the answer whole) gets every
token in one message, as neuron sends an answer produced within the interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.multiplex import Multiplexer

MODEL = "standin"
TOTAL = 64 << 30


class Unknown(Exception):
    """A model the stand-in does not hold."""


def _status(error: Exception) -> tuple[grpc.StatusCode, str]:
    code = grpc.StatusCode.NOT_FOUND if isinstance(error, Unknown) else grpc.StatusCode.INTERNAL
    return code, str(error)


class StandIn(pb_grpc.NeuronServicer):
    def __init__(self, tokens_per_message: int) -> None:
        self.tokens_per_message = tokens_per_message
        self.in_flight = 0
        self.loaded_at = time.time()
        self.messages: dict[int, pb.GenerateResponse] = {}
        self.many = Multiplexer(self._generation, _status)

    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        device = pb.Device(
            kind=pb.DEVICE_KIND_CPU,
            name="cpu",
            description="stand-in",
            total_bytes=TOTAL,
            free_bytes=TOTAL,
        )
        return pb.InfoResponse(version="standin", host=socket.gethostname(), devices=[device])

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        spec = pb.ModelSpec(id=MODEL, local=pb.LocalSource(path="/standin"))
        status = pb.ModelStatus(
            id=MODEL,
            state=pb.MODEL_STATE_READY,
            device="cpu",
            resident_bytes=1,
            loaded_at=self.loaded_at,
            last_used=time.time(),
            in_flight=self.in_flight,
            max_context=8192,
            spec=spec,
        )
        return pb.ListModelsResponse(models=[status])

    async def LoadModel(self, request: pb.LoadModelRequest, context: Any) -> pb.LoadModelResponse:
        return pb.LoadModelResponse(
            already_loaded=True,
            model=(await self.ListModels(pb.ListModelsRequest(), context)).models[0],
        )

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Any
    ) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(was_loaded=False)

    async def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for response in self._generation(request):
                yield response
        except Unknown as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def GenerateMany(
        self, requests: AsyncIterator[pb.GenerateManyRequest], context: Any
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        async with contextlib.aclosing(self.many.serve(requests, context)) as responses:
            async for response in responses:
                yield response

    async def _generation(
        self, request: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        if request.model != MODEL:
            raise Unknown(f"model {request.model!r} is not loaded")
        total = request.max_tokens if request.HasField("max_tokens") else 16
        self.in_flight += 1
        try:
            if request.message_interval > 0:  # wanted whole, and all are there at once
                counts = _fixed(total, total)
            elif self.tokens_per_message > 0:
                counts = _fixed(total, self.tokens_per_message)
            else:
                counts = _coalesced(total)
            sent = 0
            async for n in counts:
                sent += n
                if sent < total:
                    yield self.message(n)
                else:
                    last = pb.GenerateResponse(
                        text="tok " * n, tokens=n, finish_reason=pb.FINISH_REASON_LENGTH
                    )
                    last.usage.prompt_tokens = 8
                    last.usage.completion_tokens = total
                    yield last
        finally:
            self.in_flight -= 1

    def message(self, n: int) -> pb.GenerateResponse:
        if n not in self.messages:
            self.messages[n] = pb.GenerateResponse(text="tok " * n, tokens=n)
        return self.messages[n]


async def _fixed(total: int, per_message: int) -> AsyncIterator[int]:
    for start in range(0, total, per_message):
        yield min(per_message, total - start)


async def _coalesced(total: int) -> AsyncIterator[int]:
    """Token counts per message: all that were produced while the last one was written."""
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def produce() -> None:
        for _ in range(total):
            queue.put_nowait(1)
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    try:
        sent = 0
        while sent < total:
            n = await queue.get()
            while not queue.empty():
                n += queue.get_nowait()
            sent += n
            yield n
    finally:
        producer.cancel()


async def serve(listen: str, tokens_per_message: int) -> None:
    server = grpc.aio.server(options=[("grpc.http2.min_ping_interval_without_data_ms", 5000)])
    pb_grpc.add_NeuronServicer_to_server(StandIn(tokens_per_message), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    server.add_insecure_port(listen)
    await server.start()
    await health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_service.set("helexa.neuron.v1.Neuron", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:13131")
    parser.add_argument(
        "--tokens-per-message", type=int, default=1, help="0: coalesce as neuron does"
    )
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.tokens_per_message))


if __name__ == "__main__":
    main()
