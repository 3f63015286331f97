"""What both gRPC services share: a call's deadline on the event loop's clock, and the engine of
their bidirectional streams (ClassifyStream, ModelStreamInfer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.api.dataplane import ServerState

log = logging.getLogger(__name__)

STREAM_WINDOW = 128  # requests one stream may have in flight; beyond, we stop reading it


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return asyncio.get_running_loop().time() + remaining


async def serve_stream(
    request_iterator: AsyncIterator[Any],
    handle_one: Callable[[Any, float | None], Awaitable[Any]],
    state: ServerState,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[Any]:
    """A bidirectional inference stream: ``pipelined`` responses, then, if the server is shutting
    down, the stream ends UNAVAILABLE so the client reopens it elsewhere."""
    async for response in pipelined(request_iterator, handle_one, state, deadline_of(context)):
        yield response
    if state.stopping:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "server is shutting down; reopen the stream elsewhere"
        )


async def pipelined(request_iterator, handle_one, state: ServerState, deadline: float | None):
    """Bidirectional-stream engine: read requests as they come, run up to STREAM_WINDOW at once
    (``handle_one(request, deadline)`` returns the response, errors included), yield responses in
    request order. When the window is full we stop reading, so HTTP/2 flow control pushes back on
    the client and memory stays bounded. On shutdown, requests already read are still answered.
    """
    pending: asyncio.Queue = asyncio.Queue()
    window = asyncio.Semaphore(STREAM_WINDOW)
    state.streams.add(pending)

    async def reader() -> None:
        try:
            async for request in request_iterator:
                await window.acquire()
                if state.stopping:
                    break
                pending.put_nowait(asyncio.ensure_future(handle_one(request, deadline)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client's half of the stream broke
            log.debug("stream reader ended: %r", e)
        finally:
            pending.put_nowait(None)

    reader_task = asyncio.create_task(reader())
    try:
        while True:
            item = await pending.get()
            if item is None:
                if not state.stopping:
                    break
                reader_task.cancel()  # shutdown: stop reading, answer what was read
                with contextlib.suppress(asyncio.CancelledError):
                    await reader_task
                while not pending.empty():
                    item = pending.get_nowait()
                    if item is not None:
                        yield await item
                break
            response = await item
            window.release()
            yield response
    finally:
        state.streams.discard(pending)
        reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader_task
        while not pending.empty():
            item = pending.get_nowait()
            if item is not None:
                item.cancel()
