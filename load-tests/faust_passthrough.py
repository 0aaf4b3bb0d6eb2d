"""(b) of the benchmark: a bare Faust agent with default settings, ``await topic.send()`` per event.

Run as ``python faust_passthrough.py worker -l warn`` with BENCH_IN, BENCH_OUT, BENCH_APP,
BENCH_BROKER and BENCH_WEB_PORT in the environment.
"""

import os

import faust

app = faust.App(os.environ["BENCH_APP"], broker=f"kafka://{os.environ['BENCH_BROKER']}",
                web_port=int(os.environ["BENCH_WEB_PORT"]), consumer_auto_offset_reset="earliest")
source = app.topic(os.environ["BENCH_IN"], key_type=bytes, value_type=bytes, key_serializer="raw",
                   value_serializer="raw")
sink = app.topic(os.environ["BENCH_OUT"], key_type=bytes, value_type=bytes, key_serializer="raw",
                 value_serializer="raw")


@app.agent(source)
async def passthrough(stream):  # type: ignore[no-untyped-def]
    async for event in stream.events():
        await sink.send(key=event.key, value=event.value)


if __name__ == "__main__":
    app.main()
