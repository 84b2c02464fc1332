"""Slow and greedy clients against a real cortex: headers or a body trickled a byte at a time
are cut off, and one address cannot hold more than its share of connections.

A scripted neuron stands behind cortex (no request here reaches it); the clients are raw
sockets, since an HTTP client library would not misbehave on cue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import CortexProcess, cortex_config
from tests.test_cortex_streaming import ScriptedNeuron


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[CortexProcess]:
    neuron = await ScriptedNeuron().start()
    cortex = CortexProcess(
        tmp_path,
        cortex_config(
            [neuron],  # type: ignore[list-item]
            timeouts={"header": 1.5, "body": 1.5},
            limits={"max_connections_per_address": 3, "max_body": "16MiB"},
        ),
    ).start()
    try:
        await cortex.wait_ready()
        yield cortex
    finally:
        cortex.stop()
        await neuron.server.stop(None)


async def _connect(cortex: CortexProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = cortex.url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, byte: bytes
) -> bytes:
    """Send ``byte`` every 0.3 s until the server answers or closes; what it said, if anything."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            return await asyncio.wait_for(reader.read(4096), 0.3)
        except TimeoutError:
            pass
        except ConnectionResetError:  # closed with our bytes unread: the kernel resets
            return b""
        try:
            writer.write(byte)
            await writer.drain()
        except ConnectionError:
            return b""
    raise AssertionError("the slow client still holds its connection after 20 s")


async def test_headers_trickled_past_timeouts_header_lose_the_connection(
    guarded: CortexProcess,
) -> None:
    reader, writer = await _connect(guarded)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: cortex\r\nX-Slow: ")
    started = time.monotonic()
    answer = await _trickle(reader, writer, b"a")
    assert answer == b""  # closed, nothing said: it never made a request (within _trickle's 20 s)
    print(f"\nheaders trickled: connection closed after {time.monotonic() - started:.1f} s")
    writer.close()


@pytest.mark.parametrize(
    ("path", "envelope"),
    [("/v1/chat/completions", b'"code": "request_timeout"'),
     ("/v1/messages", b'{"type": "error", "error": {"type": "invalid_request_error"')],
)  # fmt: skip
async def test_a_body_trickled_past_timeouts_body_is_a_408(
    guarded: CortexProcess, path: str, envelope: bytes
) -> None:
    reader, writer = await _connect(guarded)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: cortex\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": ' % path.encode()
    )
    started = time.monotonic()
    answer = await _trickle(reader, writer, b" ")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    if b"timeouts.body" not in answer:  # the body came in a second segment
        answer += await reader.read(4096)
    assert b"timeouts.body" in answer and envelope in answer, answer
    print(f"\nbody trickled: 408 after {time.monotonic() - started:.1f} s")
    writer.close()


async def test_an_address_holds_at_most_its_connections(guarded: CortexProcess) -> None:
    held = [await _connect(guarded) for _ in range(3)]
    reader, writer = await _connect(guarded)
    answer = await asyncio.wait_for(reader.read(4096), 5)
    assert answer.startswith(b"HTTP/1.1 429")
    assert b"max_connections_per_address" in answer
    assert await asyncio.wait_for(reader.read(4096), 5) == b""  # and closed
    writer.close()
    held[0][1].close()
    await held[0][1].wait_closed()
    # One left: there is room for a new one, which is served.
    deadline = time.monotonic() + 5
    while True:
        reader, writer = await _connect(guarded)
        writer.write(b"GET /health HTTP/1.1\r\nHost: cortex\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    for _, w in held[1:]:
        w.close()


async def test_a_huge_body_never_stalls_the_streams_running_beside_it(
    guarded: CortexProcess,
) -> None:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "tick"}]}
    gaps: list[float] = []

    async def stream() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                guarded.url + "/v1/chat/completions", json={**body, "stream": True}
            ) as r:
                last = time.monotonic()
                async for _ in r.content.iter_any():
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

    ticking = asyncio.create_task(stream())
    await asyncio.sleep(0.5)
    # 300,000 messages in 8 MiB: refused by count, not parsed message by message.
    huge = {"model": "scripted", "messages": [{"role": "user", "content": "x"}] * 300_000}
    sent = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(guarded.url + "/v1/chat/completions", json=huge) as r:
            assert r.status == 400
            assert "at most 2048 messages" in (await r.json())["error"]["message"]
    answered = time.monotonic() - sent
    await ticking
    assert len(gaps) > 20
    # A ratio within the stream's own life (3 s of ticks plus any stall), not a time: before,
    # the huge body stalled it for tens of seconds, most of its life.
    assert max(gaps) < sum(gaps) / 2, (max(gaps), sum(gaps))
    print(
        f"\nhuge body: 300,000 messages refused in {answered:.2f} s; the stream beside it: "
        f"{len(gaps)} writes, largest gap {max(gaps) * 1000:.0f} ms"
    )
