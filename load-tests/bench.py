"""``make bench``: side by side on one broker, in one run.

(a) raw confluent-kafka consume -> produce passthrough, (b) a bare Faust agent passthrough
with default settings, (c) the receiving pipeline doing its real work; then end-to-end latency
at a fixed receipt rate, ClickHouse sink rows/s, and worker RSS at start and end. Figures are
printed and written to ``var/bench.json``. Ratios hold on noisy machines; absolute numbers don't.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lotflow import admin, localkafka  # noqa: E402
from lotflow.demo import OutputReader, _latencies, _percentile  # noqa: E402
from lotflow.settings import Settings, get_settings  # noqa: E402
from lotflow.simulator.faults import parse_fault_spec  # noqa: E402
from lotflow.simulator.publish import publish  # noqa: E402
from lotflow.streams import topics  # noqa: E402
from lotflow.streams.producer import producer_config  # noqa: E402


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def make_topics(settings: Settings, names: list[str]) -> None:
    client = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    futures = client.create_topics([NewTopic(n, settings.partitions, 1) for n in names])
    for future in futures.values():
        future.result()


def fill(settings: Settings, topic: str, count: int, size: int = 200) -> None:
    producer = Producer(producer_config(settings, **{"compression.type": "none"}))
    payload = b"x" * size
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=str(i % 10007).encode(), value=payload)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()


def total(settings: Settings, topic: str) -> int:
    return sum(admin.end_offsets(settings, topic).values())


def bench_raw(settings: Settings, count: int) -> float:
    src, dst = settings.topic("bench.raw-in"), settings.topic("bench.raw-out")
    make_topics(settings, [src, dst])
    fill(settings, src, count)
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"{src}-g",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    producer = Producer(producer_config(settings, **{"compression.type": "none"}))
    consumer.subscribe([src])
    seen, started = 0, 0.0
    while seen < count:
        batch = consumer.consume(10000, timeout=1.0)
        if batch and not started:
            started = time.perf_counter()
        for msg in batch:
            if msg.error():
                continue
            while True:
                try:
                    producer.produce(dst, key=msg.key(), value=msg.value())
                    break
                except BufferError:
                    producer.poll(0.05)
            seen += 1
        producer.poll(0)
        if batch:
            consumer.commit(asynchronous=True)
    producer.flush()
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


def wait_progress(read: Any, target: int, timeout: float, label: str) -> float:
    """Seconds from the first processed record to ``target`` (polling ``read``)."""
    deadline = time.monotonic() + timeout
    started = 0.0
    last_print = 0.0
    while time.monotonic() < deadline:
        value = read()
        now = time.perf_counter()
        if value > 0 and not started:
            started = now
        if value >= target:
            return now - started
        if now - last_print > 2:
            say(f"  {label}: {value}/{target}")
            last_print = now
        time.sleep(0.1)
    raise TimeoutError(f"{label}: only {read()}/{target} after {timeout}s")


def bench_faust(settings: Settings, count: int, log_dir: Path) -> float:
    src, dst = settings.topic("bench.faust-in"), settings.topic("bench.faust-out")
    make_topics(settings, [src, dst])
    fill(settings, src, count)
    env = dict(os.environ, BENCH_IN=src, BENCH_OUT=dst, BENCH_APP=f"{settings.app_id}-faust",
               BENCH_BROKER=settings.bootstrap_servers.split(",")[0], BENCH_WEB_PORT="6067")
    log = (log_dir / "faust-passthrough.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(HERE / "faust_passthrough.py"), "worker", "-l", "warn"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(log_dir))
    try:
        elapsed = wait_progress(lambda: total(settings, dst), count, 600, "faust passthrough")
    finally:
        proc.terminate()
        proc.wait(30)
    return count / elapsed


def metric_sum(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.to_env()}


def bench_pipeline(settings: Settings, receipts: int, latency_s: float, rate: float,
                   log_dir: Path) -> dict[str, Any]:
    admin.create_topics(settings)
    mix = parse_fault_spec("default")
    say(f"(c) publishing {receipts} receipts of simulated traffic")
    report = publish(settings, 11, receipts, mix, 0.0, None)
    inputs = sum(n for t, n in report.per_topic.items()
                 if t in {s.full_name(settings) for s in (topics.PURCHASE_ORDERS, topics.RECEIPTS,
                                                          topics.CERTIFICATES)})
    log = (log_dir / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "lotflow.cli", "worker"], env=worker_env(settings),
                            stdout=log, stderr=subprocess.STDOUT)
    port = settings.worker_web_port
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 90
        while not urllib_ok(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker did not start; see {log_dir / 'worker.log'}")
            time.sleep(0.2)
        result["worker_rss_start_mb"] = round(rss_mb(proc.pid), 1)
        elapsed = wait_progress(lambda: int(metric_sum(port, "lotflow_records_in_total")), inputs, 900,
                                "pipeline inputs")
        result["pipeline_msgs_per_s"] = inputs / elapsed
        result["pipeline_receipts_per_s"] = receipts / elapsed
        result["pipeline_input_messages"] = inputs
        say(f"latency: {int(latency_s * rate)} receipts at {rate:g}/s")
        reader = OutputReader(settings)
        reader.poll(2.0)
        phase_start_ms = int(time.time() * 1000)
        publish(settings, 12, int(latency_s * rate), mix, rate, None)
        time.sleep(2.0)
        reader.poll(3.0)
        lat = _latencies_since(reader, phase_start_ms)
        reader.close()
        result["latency_samples"] = len(lat)
        result["latency_p50_ms"] = round(_percentile(lat, 0.50), 1)
        result["latency_p99_ms"] = round(_percentile(lat, 0.99), 1)
        result["worker_rss_end_mb"] = round(rss_mb(proc.pid), 1)
    finally:
        proc.terminate()
        proc.wait(30)
    return result


def urllib_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
            return True
    except OSError:
        return False


def _latencies_since(reader: OutputReader, since_ms: int) -> list[float]:
    recent = [d for d in reader.decisions if d.decision_time_ms >= since_ms]
    reader.decisions = recent
    return _latencies(reader)


def bench_sink(settings: Settings, rows: int) -> dict[str, float]:
    import sink_bench  # load-tests/sink_bench.py

    figures = sink_bench.measure_sink_rows_per_s(settings, rows)
    return {"sink_rows_per_s": figures["rows_per_s"], "sink_steady_rows_per_s": figures["steady_rows_per_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw-count", type=int, default=200_000)
    parser.add_argument("--faust-count", type=int, default=30_000)
    parser.add_argument("--receipts", type=int, default=20_000)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--sink-rows", type=int, default=200_000)
    args = parser.parse_args()

    base = get_settings()
    run = time.strftime("%Y%m%d%H%M%S")
    settings = base.model_copy(update={"topic_prefix": f"bench{run}.", "app_id": f"lotflow-bench-{run}",
                                       "sink_group": f"lotflow-bench-sink-{run}", "document_wait_s": 2.0,
                                       "clickhouse_database": f"lotflow_bench_{run}"})
    log_dir = (settings.var_dir / "bench-logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    started = False
    if not localkafka.broker_answers(settings.kafka_port):
        localkafka.start(settings)
        started = True
    results: dict[str, Any] = {"machine_cores": os.cpu_count(), "partitions": settings.partitions}
    out = settings.var_dir / "bench.json"
    try:
        admin.delete_topics_with_prefix(settings, "bench")
        say(f"(a) raw confluent-kafka passthrough, {args.raw_count} messages")
        results["raw_msgs_per_s"] = bench_raw(settings, args.raw_count)
        say(f"    {results['raw_msgs_per_s']:,.0f} msg/s")
        say(f"(b) bare Faust agent passthrough, {args.faust_count} messages")
        results["faust_msgs_per_s"] = bench_faust(settings, args.faust_count, log_dir)
        say(f"    {results['faust_msgs_per_s']:,.0f} msg/s")
        results.update(bench_pipeline(settings, args.receipts, args.latency_seconds, args.rate, log_dir))
        say(f"    pipeline {results['pipeline_msgs_per_s']:,.0f} msg/s, latency p50 {results['latency_p50_ms']} ms "
            f"p99 {results['latency_p99_ms']} ms")
        out.write_text(json.dumps(results, indent=2))  # keep what was measured if a later stage fails
        say(f"sink: {args.sink_rows} rows")
        results.update(bench_sink(settings, args.sink_rows))
    finally:
        admin.delete_topics_with_prefix(settings, settings.topic_prefix)
        if started:
            localkafka.stop(settings)
    results["ratio_vs_faust"] = results["pipeline_msgs_per_s"] / results["faust_msgs_per_s"]
    results["ratio_vs_raw"] = results["pipeline_msgs_per_s"] / results["raw_msgs_per_s"]
    results = {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}
    out.write_text(json.dumps(results, indent=2))
    print("\n============ lotflow bench ============")
    for key, value in results.items():
        print(f"{key:<28}{value}")
    print(f"targets: ratio_vs_faust >= 2.5, latency_p99_ms < 50 at {args.rate:g}/s, sink_rows_per_s >= 100000, "
          "worker RSS flat")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
