"""Model lifecycle benchmark: first GGUF load (materialisation), second load, unload, and the
time from SIGTERM to exit with streams in flight, against a real neuron process.

    .venv/bin/python -m bench.lifecycle [--streams 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path

import grpc

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import NeuronProcess, chat, demo_spec, neuron_config, read_rest


async def run(streams: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="helexa-bench-lifecycle-"))
    neuron = NeuronProcess(workdir, neuron_config(cache_dir=workdir / "cache", drain_timeout=60))
    try:
        neuron.start()
        await neuron.wait_serving()
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            spec = demo_spec("bench")
            started = time.perf_counter()
            await stub.LoadModel(pb.LoadModelRequest(spec=spec))
            figures["first load, GGUF materialised (s)"] = time.perf_counter() - started
            started = time.perf_counter()
            await stub.UnloadModel(pb.UnloadModelRequest(id="bench"))
            figures["unload (s)"] = time.perf_counter() - started
            started = time.perf_counter()
            await stub.LoadModel(pb.LoadModelRequest(spec=spec))
            figures["second load, from the cache (s)"] = time.perf_counter() - started

            calls = [
                stub.Generate(
                    chat("bench", f"Tell me a story about the number {i}.", max_tokens=48)
                )
                for i in range(streams)
            ]
            for call in calls:
                await call.read()
            neuron.send(signal.SIGTERM)
            signalled = time.perf_counter()
            await asyncio.gather(*(read_rest(call) for call in calls))
            figures[f"SIGTERM to last stream end, {streams} in flight (s)"] = (
                time.perf_counter() - signalled
            )
        await asyncio.to_thread(neuron.wait_exit, 120)
        figures[f"SIGTERM to exit 0, {streams} in flight (s)"] = time.perf_counter() - signalled
        assert neuron.proc is not None and neuron.proc.returncode == 0, neuron.log()
    finally:
        neuron.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    figures = asyncio.run(run(args.streams))
    print("| lifecycle step | seconds |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
