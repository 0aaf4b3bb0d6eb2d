"""``take_batches`` on a real Faust agent (Faust's agent test context: no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest

from lotflow.streams.batching import take_batches


def _app() -> faust.App:
    return faust.App("lotflow-batching-test", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False)


def test_a_batch_takes_what_is_queued_without_waiting_and_never_exceeds_its_size() -> None:
    app = _app()
    batches: list[list[int]] = []
    acked_while_handled: list[bool] = []

    @app.agent(app.channel())
    async def agent(stream: Any) -> None:
        async for batch in take_batches(stream, 3, max_wait_s=30.0):
            batches.append([event.value for event in batch])
            acked_while_handled.extend(event.message.acked for event in batch)

    async def run() -> None:
        async with agent.test_context() as ctx:
            for i in range(7):
                await ctx.put(i, wait=False)
            for _ in range(100):  # far less than the 30 s a batch may wait: the queue drained
                if sum(map(len, batches)) == 7:
                    break
                await asyncio.sleep(0.01)
            await ctx.put(100, wait=False)
            for _ in range(100):
                if len(batches) == 4:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(run())
    assert batches == [[0, 1, 2], [3, 4, 5], [6], [100]]
    assert not any(acked_while_handled)  # acked only after the agent's body returned


def test_events_of_a_batch_are_acked_after_the_agent_handled_it() -> None:
    app = _app()
    events: list[Any] = []

    @app.agent(app.channel())
    async def agent(stream: Any) -> None:
        async for batch in take_batches(stream, 10, max_wait_s=30.0):
            events.extend(batch)

    async def run() -> None:
        async with agent.test_context() as ctx:
            for i in range(4):
                await ctx.put(i, wait=False)
            for _ in range(100):
                if len(events) == 4 and all(e.message.acked for e in events):
                    break
                await asyncio.sleep(0.01)

    asyncio.run(run())
    assert [e.value for e in events] == [0, 1, 2, 3]
    assert all(e.message.acked for e in events)


def test_a_batch_needs_room_for_one_event() -> None:
    async def first() -> None:
        await anext(take_batches(object(), 0, 1.0))

    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(first())


def test_a_batch_whose_body_does_not_complete_stays_unacked() -> None:
    app = _app()
    taken: list[Any] = []

    @app.agent(app.channel())
    async def agent(stream: Any) -> None:
        async for batch in take_batches(stream, 10, max_wait_s=30.0):
            taken.extend(batch)
            break  # the body never asks for the next batch (as when it fails before its commit)
        await asyncio.sleep(30)

    async def run() -> None:
        async with agent.test_context() as ctx:
            for i in range(3):
                await ctx.put(i, wait=False)
            for _ in range(100):
                if len(taken) == 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)

    asyncio.run(run())
    assert [e.value for e in taken] == [0, 1, 2]
    assert not any(e.message.acked for e in taken)  # Faust will not commit their offsets


def test_with_acks_off_the_agent_acks_and_is_told_when_no_more_records_come() -> None:
    # the worker's way: a batch is acked by the agent once its transaction committed, which may be
    # after the next batch was taken; when no more records come, on_idle lets it ack the last one
    app = _app()
    batches: list[list[Any]] = []
    idle_calls: list[int] = []
    acked_when_taken: list[bool] = []

    @app.agent(app.channel())
    async def agent(stream: Any) -> None:
        async def on_idle() -> None:
            idle_calls.append(len(batches))
            for batch in batches:
                for event in batch:
                    if not event.message.acked:
                        await stream.ack(event)

        async for batch in take_batches(stream, 2, max_wait_s=0.05, acks=False, on_idle=on_idle):
            acked_when_taken.extend(event.message.acked for batch_ in batches for event in batch_)
            batches.append(batch)

    async def run() -> None:
        async with agent.test_context() as ctx:
            for i in range(5):
                await ctx.put(i, wait=False)
            for _ in range(200):
                if sum(map(len, batches)) == 5 and idle_calls:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)

    asyncio.run(run())
    assert [[e.value for e in b] for b in batches] == [[0, 1], [2, 3], [4]]
    assert not any(acked_when_taken)  # take_batches acked nothing itself
    assert idle_calls and idle_calls[0] == 3  # idle once the queue was drained
    assert all(e.message.acked for b in batches for e in b)
