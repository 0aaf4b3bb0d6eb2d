"""``make bench``: side by side on one broker, in one run.

(a) raw confluent-kafka consume -> produce passthrough, (b) a bare Faust agent passthrough
with default settings, (c) the receiving pipeline doing its real work on a backlog of 100,000
simulated receipts, its worker's RSS sampled every second (half-way and at the end, for the
record: a backlog's state is not stationary) and its CPU time read from /proc; then end-to-end
latency at a fixed receipt rate (every receipt published in that phase must be decided, or the
bench fails), again at a rate one worker sustains (``--low-rate``), and the memory run: 100,000
receipts at a steady rate one worker sustains, RSS half-way and at the end (the memory target's
figures, ``measure_steady_memory``); (b') the bare Faust passthrough
again: ``ratio_vs_faust`` is taken against the mean of (b) and (b'), which bracket (c) in time,
since this machine's speed drifts over minutes; then where the time goes (``stage_us``: the
pure processor's stages on the same traffic, producing and committing, and the rest of the
worker's time per event: ``load-tests/stages.py``); scale-out (one worker, then two in one
group, on copies of the same traffic: CPU seconds per 1,000 input events); ClickHouse sink
rows/s beside a bare insert of the same rows; and worker RSS holding 100,000 open POs plus a
blanket PO with 500 partial receipts. Figures are printed and written to ``var/bench.json``,
also when a stage fails (then with ``failed`` and exit status 1). Ratios hold on noisy
machines; absolute numbers don't.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lotflow import admin, localkafka  # noqa: E402
from lotflow.childproc import child_env, metric_value, process_rss_mb, scrape_metrics  # noqa: E402
from lotflow.demo import OutputReader, _latencies, _percentile  # noqa: E402
from lotflow.kafka_clients import RedeliveringProducer, client_config, produce, producer_config  # noqa: E402
from lotflow.reconcile import WAIT_REASONS, Decision  # noqa: E402
from lotflow.settings import Settings, get_settings  # noqa: E402
from lotflow.simulator.faults import parse_fault_spec  # noqa: E402
from lotflow.simulator.publish import publish  # noqa: E402
from lotflow.streams import topics  # noqa: E402

Ref = tuple[str, int, int]
BENCH_RETENTION_S = 20.0
# The memory run's rate, as a share of the backlog capacity just measured: the bench's publisher,
# its reader (which decodes every output) and the broker share the 2 cores with the worker, and
# half fell behind on a slow hour (run 27); a run whose p50 exceeds the limit is marked not steady.
STEADY_SHARE = 0.4
STEADY_P50_LIMIT_MS = 1000.0


class BenchFailed(RuntimeError):
    """A stage could not produce an honest figure: the bench exits non-zero."""


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def make_topics(settings: Settings, names: list[str]) -> None:
    client = AdminClient(client_config(settings))
    futures = client.create_topics([NewTopic(n, settings.partitions, 1) for n in names])
    for future in futures.values():
        future.result()


def fill(settings: Settings, topic: str, count: int, size: int = 200) -> None:
    producer = RedeliveringProducer(producer_config(settings, **{"compression.type": "none"}))
    payload = b"x" * size
    for i in range(count):
        producer.send(topic, str(i % 10007).encode(), payload)
    producer.flush(300)


def total(settings: Settings, topic: str) -> int:
    return sum(admin.end_offsets(settings, topic).values())


def bench_raw(settings: Settings, count: int) -> float:
    src, dst = settings.topic("bench.raw-in"), settings.topic("bench.raw-out")
    make_topics(settings, [src, dst])
    fill(settings, src, count)
    consumer = Consumer(client_config(settings, **{"group.id": f"{src}-g", "auto.offset.reset": "earliest",
                                                   "enable.auto.commit": False,
                                                   "isolation.level": "read_committed"}))
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
            produce(producer, dst, msg.key(), msg.value())
            seen += 1
        producer.poll(0)
        if batch:
            consumer.commit(asynchronous=True)
    if producer.flush(120):
        raise BenchFailed("raw passthrough: records left undelivered")
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


def wait_progress(read: Callable[[], int], target: int, timeout: float, label: str,
                  proc: subprocess.Popen[bytes] | None = None) -> float:
    """Records per second from the first reading of progress to ``target`` (``read`` polled
    once a second, the same for every stage; fails when ``proc`` exits first)."""
    rate, _ = drain(read, target, timeout, label, proc)
    return rate


def drain(read: Callable[[], int], target: int, timeout: float, label: str,
          proc: subprocess.Popen[bytes] | None = None,
          sample: Callable[[], Any] | None = None) -> tuple[float, list[tuple[int, Any]]]:
    """Records per second from the first reading of progress to ``target``, and (records done,
    ``sample()``) at every reading. Progress is read once a second (ten times in the last two
    seconds): reading the worker's /metrics costs its event loop time, so it is not read more
    often than needed; the bare Faust agent's progress is read the same way, on broker offsets."""
    samples: list[tuple[int, Any]] = []
    deadline = time.monotonic() + timeout
    started = last_print = 0.0
    done_at_start = 0
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchFailed(f"{label}: the process exited with {proc.returncode}")
        done = read()
        now = time.perf_counter()
        if done > 0 and not started:
            started, done_at_start = now, done
        if started and sample is not None:
            samples.append((done, sample()))
        if done >= target:
            return (done - done_at_start) / max(now - started, 1e-9), samples
        if now - last_print > 5:
            say(f"  {label}: {done}/{target}")
            last_print = now
        # once a second; ten times a second in the last two seconds, so the end is not late
        interval = 1.0
        if started and done > done_at_start:
            seconds_left = (target - done) / ((done - done_at_start) / (now - started))
            interval = 0.1 if seconds_left < 2.0 else 1.0
        time.sleep(max(0.0, interval - (time.perf_counter() - now)))
    raise BenchFailed(f"{label}: only {read()}/{target} after {timeout}s")


def bench_faust(settings: Settings, count: int, log_dir: Path, run: int = 1) -> float:
    src, dst = settings.topic(f"bench.faust-in-{run}"), settings.topic(f"bench.faust-out-{run}")
    make_topics(settings, [src, dst])
    fill(settings, src, count)
    env = child_env(settings, BENCH_IN=src, BENCH_OUT=dst, BENCH_APP=f"{settings.app_id}-faust",
                    BENCH_BROKER=settings.bootstrap_servers.split(",")[0], BENCH_WEB_PORT="6067")
    log = (log_dir / f"faust-passthrough-{run}.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(HERE / "faust_passthrough.py"), "worker", "-l", "warn"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(log_dir))
    try:
        rate = wait_progress(lambda: total(settings, dst), count, 600, "faust passthrough")
    finally:
        stop(proc)
    return rate


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_metric(settings: Settings, name: str, **labels: str) -> float | None:
    """A metric of the worker's /metrics; None when it does not answer (busy or gone)."""
    try:
        return metric_value(scrape_metrics(settings.worker_web_port, settings.worker_web_host, timeout=5),
                            name, **labels)
    except OSError:
        return None


def records_in(settings: Settings) -> Callable[[], int]:
    """Reads the worker's ``lotflow_records_in_total``; the last value read while it does not answer."""
    last = 0

    def read() -> int:
        nonlocal last
        value = worker_metric(settings, "lotflow_records_in_total")
        if value is not None:
            last = int(value)
        return last

    return read


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "lotflow.cli", "worker"], env=child_env(settings),
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            scrape_metrics(settings.worker_web_port, settings.worker_web_host, timeout=1)
            return proc
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            stop(proc)
            raise BenchFailed(f"worker did not start; see {log}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def end_positions(settings: Settings, specs: list[topics.TopicSpec]) -> dict[tuple[str, int], int]:
    """Current end offset of every partition of ``specs``: where a reader of what follows starts."""
    out: dict[tuple[str, int], int] = {}
    for spec in specs:
        name = spec.full_name(settings)
        out.update({(name, p): end for p, end in admin.end_offsets(settings, name).items()})
    return out


def bench_pipeline(settings: Settings, receipts: int, latency_s: float, rate: float, latency_timeout: float,
                   log_dir: Path, result: dict[str, Any], low_rate: float = 0.0, steady_receipts: int = 0,
                   steady_rate: float = 0.0) -> None:
    """(c) throughput and memory over a long backlog, then latency; figures go into ``result``
    as they are measured."""
    admin.create_topics(settings)
    mix = parse_fault_spec("default")
    say(f"(c) publishing {receipts} receipts of simulated traffic")
    report = publish(settings, 11, receipts, mix, 0.0, None)
    input_specs = [topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES]
    inputs = sum(n for t, n in report.per_topic.items() if t in {s.full_name(settings) for s in input_specs})
    # State is bounded by retention (30 days in production); a short retention bounds it within
    # this run, so the run reaches its steady state and start/end RSS shows whether anything
    # grows beyond the state itself.
    settings = settings.model_copy(update={"po_state_retention_s": BENCH_RETENTION_S})
    proc = start_worker(settings, log_dir / "worker.log")
    try:
        result["worker_rss_boot_mb"] = round(process_rss_mb(proc.pid), 1)
        result["compiled_core"] = worker_metric(settings, "lotflow_compiled_core") == 1  # lotflow/compiled.py
        msgs_per_s, samples = drain(records_in(settings), inputs, 1800, "pipeline inputs", proc,
                                    sample=lambda: (process_rss_mb(proc.pid), process_cpu_s(proc.pid),
                                                    state_keys(settings)))
        rss = [(done, mb) for done, (mb, _, _) in samples]
        (done_first, (_, cpu_first, _)), (done_last, (_, cpu_last, _)) = samples[0], samples[-1]
        result["worker_cpu_us_per_event"] = 1e6 * (cpu_last - cpu_first) / max(done_last - done_first, 1)
        metrics = scrape_metrics(settings.worker_web_port, settings.worker_web_host, timeout=10)
        transactions = metric_value(metrics, "lotflow_transaction_seconds_count", node="receiving")
        batches = metric_value(metrics, "lotflow_batch_duration_seconds_count", node="receiving")
        result["transaction_ms_per_batch_worker"] = 1000 * metric_value(
            metrics, "lotflow_transaction_seconds_sum", node="receiving") / max(transactions, 1)
        result["events_per_batch_worker"] = done_last / max(batches, 1)
        # "start": half-way through the backlog, past the warm-up (the state grows to its steady
        # size under the 20 s retention, and the allocator to its high-water mark, within the
        # first ~40 %: worker_rss_backlog_series_mb shows the ramp); "end": when all of it is handled.
        half = next(n for n, (done, _) in enumerate(rss) if done >= inputs // 2)
        result["worker_rss_backlog_start_mb"] = round(rss[half][1], 1)
        result["worker_rss_backlog_end_mb"] = round(rss[-1][1], 1)
        # The state's keys at the same two points, and the RSS above boot per key: under a backlog
        # the inputs of a partition are read at different points in time (documents first, the
        # receipts later), so the keys alive within the wall-clock retention need not be flat;
        # RSS per key tells a leak (rising) from a bigger state (flat). The memory target is taken
        # on a steady stream instead (``measure_steady_memory``).
        keys_start, keys_end = samples[half][1][2], samples[-1][1][2]
        result["worker_state_keys_backlog_start"], result["worker_state_keys_backlog_end"] = keys_start, keys_end
        boot = result["worker_rss_boot_mb"]
        result["worker_rss_kb_per_state_key_backlog_start"] = \
            1024 * (result["worker_rss_backlog_start_mb"] - boot) / max(keys_start, 1)
        result["worker_rss_kb_per_state_key_backlog_end"] = \
            1024 * (result["worker_rss_backlog_end_mb"] - boot) / max(keys_end, 1)
        result["worker_rss_backlog_max_mb"] = round(max(mb for _, mb in rss), 1)
        step = max(1, len(rss) // 20)  # about twenty points of the run, for the record
        result["worker_rss_backlog_series_mb"] = [[done, round(mb)] for done, mb in rss[::step]]
        result["pipeline_msgs_per_s"] = msgs_per_s
        result["pipeline_receipts_per_s"] = msgs_per_s * receipts / inputs
        result["pipeline_input_messages"] = inputs
        result["pipeline_receipts"] = receipts
        say(f"    pipeline {result['pipeline_msgs_per_s']:,.0f} msg/s; worker RSS "
            f"{result['worker_rss_backlog_start_mb']} MB half-way, {result['worker_rss_backlog_end_mb']} MB at the "
            f"end; state keys {keys_start} -> {keys_end}")
        # Each latency phase starts once the state of the phase before has been forgotten: the
        # 20 s retention would otherwise expire a whole backlog's state in a burst inside the
        # phase (a steady stream expires state as fast as it creates it; that part is measured).
        time.sleep(BENCH_RETENTION_S + 10)
        measure_latency(settings, proc, int(latency_s * rate), rate, latency_timeout, log_dir, result)
        if low_rate > 0:
            # the same at a rate the worker sustains: what a receipt waits when no queue builds
            time.sleep(BENCH_RETENTION_S + 10)
            measure_latency(settings, proc, int(latency_s * low_rate), low_rate, latency_timeout, log_dir, result,
                            key="latency_low_rate", seed=15)
            result["latency_low_rate"] = low_rate
        if steady_receipts > 0:
            # at a fixed 600/s a slow day's worker fell behind (p50 28 s): the state then grows with
            # the queue, and the run measures the backlog again
            rate = steady_rate or round(result["pipeline_receipts_per_s"] * STEADY_SHARE)
            time.sleep(BENCH_RETENTION_S + 10)
            measure_steady_memory(settings, proc, steady_receipts, rate, latency_timeout, log_dir, result)
    finally:
        if proc.poll() is None:
            result["worker_rss_after_latency_mb"] = round(process_rss_mb(proc.pid), 1)
        stop(proc)


def measure_latency(settings: Settings, proc: subprocess.Popen[bytes], count: int, rate: float, timeout: float,
                    log_dir: Path, result: dict[str, Any], key: str = "latency", seed: int = 12,
                    on_progress: Callable[[str], None] | None = None) -> None:
    """Publish ``count`` receipts at ``rate``/s while reading (read_committed) until every one of
    them is decided — verified, exception or dead letter, matched by the receipt's
    topic/partition/offset — and every input it references is seen. A receipt's latency: from
    the broker time of the last input its decision waited for to when this reader received the
    decision (``_decided_`` figures: to the worker's decision time, before its transaction
    committed). Fails after ``timeout`` s past the end of publishing, with the partial figures in
    ``result``."""
    say(f"{key}: {count} receipts at {rate:g}/s")
    watched = [topics.VERIFIED, topics.EXCEPTIONS, topics.DEAD_LETTERS, topics.RECEIPTS,
               topics.PURCHASE_ORDERS, topics.CERTIFICATES]
    reader = OutputReader(settings, start=end_positions(settings, watched), consume_timeout_s=0.005)
    truth_path = log_dir / f"{key}-truth.jsonl"
    try:
        # Published from a thread while this one reads, so each decision's visible time is when it
        # arrived; simulated and encoded first, so the load generator does not take the worker's CPU.
        published: dict[str, Any] = {}
        stop_publishing = threading.Event()

        def progress(line: str) -> None:  # called about once a second: where publishing can stop
            if stop_publishing.is_set():
                raise InterruptedError("the latency phase stopped")
            if on_progress is not None:
                on_progress(line)

        def publish_all() -> None:
            try:
                published["report"] = publish(settings, seed, count, parse_fault_spec("default"), rate, progress,
                                              truth_path=truth_path, prepare=True)
            except BaseException as exc:  # raised again below, in the reading thread
                published["error"] = exc

        publisher = threading.Thread(target=publish_all, name="latency-publisher", daemon=True)
        publisher.start()
        seen: list[Decision] = []
        try:
            while publisher.is_alive():
                if proc.poll() is not None:
                    raise BenchFailed(f"{key}: the worker exited with {proc.returncode} while publishing")
                reader.poll(0.5)
                seen.extend(reader.decisions)
                reader.decisions.clear()
        finally:
            stop_publishing.set()
            publisher.join(30)
        if "error" in published:
            raise published["error"]
        report = published["report"]
        if report.failed:
            raise BenchFailed(f"latency: {report.failed} receipts were not published: {report.errors[:3]}")
        truths = [json.loads(line) for line in truth_path.read_text().splitlines()]
        expected: set[Ref] = {(t["source_topic"], t["source_partition"], t["source_offset"]) for t in truths}
        result[f"{key}_receipts"] = len(expected)
        reader.decisions = seen
        deadline = time.monotonic() + timeout
        decided: dict[Ref, Decision] = {}
        last_print = 0.0
        while True:
            reader.poll(0.5)
            for d in reader.decisions:
                if d.ref in expected:
                    decided.setdefault(d.ref, d)  # the first decision of a receipt counts
            reader.decisions.clear()
            unseen_inputs = [r for r in decided if r not in reader.input_ts]
            if len(decided) == len(expected) and not unseen_inputs:
                break
            now = time.monotonic()
            if now - last_print > 2:
                say(f"  latency: decided {len(decided)}/{len(expected)}")
                last_print = now
            if proc.poll() is not None or now > deadline:
                why = "the worker exited" if proc.poll() is not None else f"{timeout:g}s after publishing"
                record_latency(reader, list(decided.values()), result, key)
                result[f"{key}_receipts_decided"] = len(decided)
                raise BenchFailed(f"latency: only {len(decided)}/{len(expected)} receipts decided ({why})")
        result[f"{key}_receipts_decided"] = len(decided)
        record_latency(reader, list(decided.values()), result, key)
    finally:
        reader.close()
    if result[f"{key}_samples"] != result[f"{key}_samples_expected"]:
        raise BenchFailed(f"latency: {result[f'{key}_samples']} samples for "
                          f"{result[f'{key}_samples_expected']} decided receipts")


def measure_steady_memory(settings: Settings, proc: subprocess.Popen[bytes], count: int, rate: float,
                          timeout: float, log_dir: Path, result: dict[str, Any]) -> None:
    """Worker RSS over ``count`` receipts published at ``rate``/s, a rate one worker sustains: the
    memory target's run. Start: the first sample once half of them were published (the state has
    long reached its size under the 20 s retention); end: when every one is decided. A backlog's state is not
    stationary (what is alive within a wall-clock retention depends on the mix read each second),
    a steady stream's is, apart from open exceptions, which nobody decides here and which are
    kept until a person does (``worker_state_keys_steady_*`` shows the keys at both points). Every
    receipt is decided and timed, as in the latency phase (``steady_*`` latency figures)."""
    if count <= 0 or rate <= 0:
        raise BenchFailed(f"the memory run needs receipts and a rate: {count} at {rate:g}/s")
    samples: list[tuple[float, float, int]] = []
    done = threading.Event()
    half_published: list[float] = []  # when the publisher reported half the receipts sent

    def on_progress(line: str) -> None:  # "receipts <n>/<count> (...)"
        sent = int(line.split()[1].split("/")[0])
        if sent >= count // 2 and not half_published:
            half_published.append(time.monotonic())

    def sample() -> None:
        while not done.wait(1.0):
            if proc.poll() is None:
                samples.append((time.monotonic(), process_rss_mb(proc.pid), state_keys(settings)))

    sampler = threading.Thread(target=sample, name="steady-rss", daemon=True)
    began = time.monotonic()
    sampler.start()
    try:
        measure_latency(settings, proc, count, rate, timeout, log_dir, result, key="steady", seed=16,
                        on_progress=on_progress)
    finally:
        done.set()
        sampler.join(5)
    if proc.poll() is None:
        samples.append((time.monotonic(), process_rss_mb(proc.pid), state_keys(settings)))
    if not samples or not half_published:
        raise BenchFailed("the memory run has no RSS sample half-way (the worker exited?)")
    half = next((s for s in samples if s[0] >= half_published[0]), samples[-1])
    result["steady_rate"] = rate
    result["steady_receipts"] = count
    result["worker_rss_start_mb"], result["worker_rss_end_mb"] = round(half[1], 1), round(samples[-1][1], 1)
    result["worker_state_keys_steady_start"], result["worker_state_keys_steady_end"] = half[2], samples[-1][2]
    step = max(1, len(samples) // 20)
    result["worker_rss_steady_series_mb"] = [[round(t - began), round(mb)] for t, mb, _ in samples[::step]]
    # A worker that fell behind holds a queue's state, not a steady one: the run then measured a
    # backlog again (run 27: 605/s, p50 32 s, keys 84k -> 155k), and the figure says so.
    result["steady_kept_up"] = result.get("steady_p50_ms", math.inf) < STEADY_P50_LIMIT_MS
    say(f"    steady {rate:g}/s: worker RSS {result['worker_rss_start_mb']} MB half-way, "
        f"{result['worker_rss_end_mb']} MB at the end; state keys {half[2]} -> {samples[-1][2]}"
        f"{'' if result['steady_kept_up'] else '; the worker FELL BEHIND: not a steady run'}")


def record_latency(reader: OutputReader, decisions: list[Decision], result: dict[str, Any],
                   key: str = "latency") -> None:
    """Latency figures of ``decisions``. A sample is expected for every decision except dead
    letters (no decision time) and expired document waits (they measure the wait)."""
    expected = [d for d in decisions if d.outcome != "DEAD_LETTER" and not WAIT_REASONS.intersection(d.reasons)]
    reader.decisions = decisions
    lat = _latencies(reader, visible=True)
    decided = _latencies(reader)
    result[f"{key}_samples"] = len(lat)
    result[f"{key}_samples_expected"] = len(expected)
    result[f"{key}_dead_letters"] = sum(d.outcome == "DEAD_LETTER" for d in decisions)
    result[f"{key}_expired_waits"] = len(decisions) - len(expected) - result[f"{key}_dead_letters"]
    result[f"{key}_p50_ms"] = round(_percentile(lat, 0.50), 1)
    result[f"{key}_p99_ms"] = round(_percentile(lat, 0.99), 1)
    result[f"{key}_max_ms"] = round(max(lat, default=0.0), 1)
    # the same from the worker's decision time: what the transaction's commit adds is the difference
    result[f"{key}_decided_p50_ms"] = round(_percentile(decided, 0.50), 1)
    result[f"{key}_decided_p99_ms"] = round(_percentile(decided, 0.99), 1)


def bench_sink(settings: Settings, rows: int) -> dict[str, float]:
    import sink_bench  # load-tests/sink_bench.py

    figures = sink_bench.measure_sink_rows_per_s(settings, rows)
    return {"sink_rows_per_s": figures["rows_per_s"], "sink_steady_rows_per_s": figures["steady_rows_per_s"],
            "sink_bare_insert_rows_per_s": figures["bare_insert_rows_per_s"],
            "sink_vs_bare_insert": figures["rows_per_s"] / figures["bare_insert_rows_per_s"],
            "sink_inserts": figures["inserts"]}


def state_keys(settings: Settings) -> int:
    """Keys of the PO state the worker holds (``lotflow_state_keys``; -1 if it does not answer)."""
    try:
        metrics = scrape_metrics(settings.worker_web_port, settings.worker_web_host, timeout=2)
    except OSError:
        return -1
    return int(metric_value(metrics, "lotflow_state_keys", table="po"))


def input_lag(settings: Settings) -> int:
    """Records of the input topics the worker's group has not committed yet."""
    specs = [topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES]  # specs: read whole, no group
    return sum(sum(admin.consumer_lag(settings, settings.app_id, s.full_name(settings)).values()) for s in specs)


def bench_open_pos(base: Settings, pos: int, blanket: int, timeout: float, log_dir: Path,
                   result: dict[str, Any]) -> None:
    """Worker RSS once it holds ``pos`` open POs and a blanket PO with ``blanket`` receipts."""
    from open_pos import open_po_events, publish_events  # load-tests/open_pos.py

    settings = base.model_copy(update={"topic_prefix": f"{base.topic_prefix}openpos.",
                                       "app_id": f"{base.app_id}-openpos"})
    admin.create_topics(settings)
    proc = start_worker(settings, log_dir / "worker-open-pos.log")
    try:
        result["worker_rss_open_pos_baseline_mb"] = round(process_rss_mb(proc.pid), 1)
        say(f"open POs: publishing {pos} open POs + 1 blanket PO with {blanket} partial receipts")
        sent = publish_events(settings, open_po_events(13, pos, blanket, int(time.time() * 1000)))
        inputs = sum(n for t, n in sent.items() if t != topics.MATERIAL_SPECS.full_name(settings))
        wait_progress(records_in(settings), inputs, timeout, "open-PO inputs", proc)
        deadline = time.monotonic() + 120
        while (lag := input_lag(settings)) > 0:  # consumed *and* committed
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchFailed(f"open POs: the worker's group still lags {lag} records")
            time.sleep(0.5)
        metric_lag = worker_metric(settings, "lotflow_consumer_lag")
        if metric_lag:
            say(f"  note: lotflow_consumer_lag reads {metric_lag:g} with the group committed to the end")
        result["worker_rss_open_pos_mb"] = round(process_rss_mb(proc.pid), 1)
        result["open_pos"] = pos
        result["open_pos_blanket_receipts"] = blanket
        result["open_pos_input_messages"] = inputs
    finally:
        stop(proc)
        admin.delete_topics_with_prefix(settings, settings.topic_prefix)


def group_assignment(settings: Settings) -> tuple[int, int]:
    """(members, input partitions assigned) of the worker's consumer group."""
    inputs = {spec.full_name(settings) for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES)}
    client = AdminClient(client_config(settings))
    try:
        description = client.describe_consumer_groups([settings.app_id])[settings.app_id].result(10)
    except Exception:  # not formed yet
        return 0, 0
    members = list(description.members)
    assigned = sum(1 for m in members for tp in (m.assignment.topic_partitions if m.assignment else [])
                   if tp.topic in inputs)
    return len(members), assigned


def bench_scaleout(base: Settings, receipts: int, log_dir: Path, result: dict[str, Any]) -> None:
    """CPU seconds per 1,000 input events: one worker, then two in one group, each on its own copy
    of the same traffic (published once the group holds every input partition, so no rebalance
    falls in the measurement). Two workers should add capacity, not overhead. On this machine the
    two workers, the broker and the publisher share two cores: contention is in the figure too."""
    mix = parse_fault_spec("default")
    for n in (1, 2):
        settings = base.model_copy(update={"topic_prefix": f"{base.topic_prefix}scale{n}.",
                                           "app_id": f"{base.app_id}-scale{n}",
                                           "po_state_retention_s": BENCH_RETENTION_S})
        admin.create_topics(settings)
        workers = [settings.model_copy(update={"worker_web_port": 6081 + i, "worker_instance_id": f"scale{n}-{i}"})
                   for i in range(n)]
        procs = [start_worker(w, log_dir / f"worker-scale{n}-{i}.log") for i, w in enumerate(workers)]
        try:
            deadline = time.monotonic() + 120
            while group_assignment(settings) != (n, 3 * settings.partitions):
                if time.monotonic() > deadline:
                    raise BenchFailed(f"scale-out: {n} workers hold {group_assignment(settings)} (members, "
                                      "input partitions) after 120 s")
                time.sleep(1)
            time.sleep(3)  # the assignment is settled: tables recovered, streams resumed
            cpu_before = sum(process_cpu_s(p.pid) for p in procs)
            say(f"scale-out: {n} worker(s), {receipts} receipts")
            report = publish(settings, 14, receipts, mix, 0.0, None)
            inputs = sum(v for t, v in report.per_topic.items()
                         if t in {s.full_name(settings) for s in (topics.PURCHASE_ORDERS, topics.RECEIPTS,
                                                                    topics.CERTIFICATES)})
            readers = [records_in(w) for w in workers]

            def handled(readers: list[Callable[[], int]] = readers) -> int:
                return sum(read() for read in readers)

            rate, _ = drain(handled, inputs, 900, f"scale-out {n}", None)  # from the first progress read
            cpu = sum(process_cpu_s(p.pid) for p in procs) - cpu_before
            result[f"scaleout_cpu_s_per_1000_{n}_worker{'s' if n > 1 else ''}"] = 1000 * cpu / inputs
            result[f"scaleout_msgs_per_s_{n}_worker{'s' if n > 1 else ''}"] = rate
            for p in procs:
                if p.poll() is not None:
                    raise BenchFailed(f"scale-out: a worker exited with {p.returncode}")
        finally:
            for p in procs:
                stop(p)
            admin.delete_topics_with_prefix(settings, settings.topic_prefix)
    result["scaleout_cpu_ratio"] = (result["scaleout_cpu_s_per_1000_2_workers"]
                                    / result["scaleout_cpu_s_per_1000_1_worker"])


def bench_stages(settings: Settings, receipts: int, result: dict[str, Any]) -> None:
    """``stage_us``: µs per input event of the pure processor's stages, producing and committing,
    and what the worker spends beyond them (Faust's consumer path, the timers, contention)."""
    from stages import measure_stages  # load-tests/stages.py

    # the pipeline phase's state retention: the processor forgets state at the worker's pace
    stage_settings = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}stages.",
                                                 "po_state_retention_s": BENCH_RETENTION_S})
    try:
        figures = measure_stages(stage_settings, receipts, produce_to=stage_settings, say=say)
    finally:
        admin.delete_topics_with_prefix(stage_settings, stage_settings.topic_prefix)
    if "pipeline_msgs_per_s" in result:
        # What the worker spends per event beyond the processor and handing outputs to the producer
        # (its commits overlap the next batch): Faust's consumer path (~85 µs with a no-op processor),
        # the timers, polling the shared history and specs, and the processor running slower beside
        # the fetcher thread and the broker than alone.
        worker_us = 1e6 / result["pipeline_msgs_per_s"]
        figures["worker_wall"] = round(worker_us, 2)
        figures["worker_remainder"] = round(worker_us - figures["processor"] - figures["produce"], 2)
    result["stage_us"] = figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw-count", type=int, default=200_000)
    parser.add_argument("--faust-count", type=int, default=30_000)
    parser.add_argument("--receipts", type=int, default=100_000)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--low-rate", type=float, default=200.0,
                        help="receipts/s of a second latency phase at a rate one worker sustains (0: none)")
    parser.add_argument("--steady-receipts", type=int, default=100_000,
                        help="receipts of the memory run, published at --steady-rate (0: none)")
    parser.add_argument("--steady-rate", type=float, default=0.0,
                        help="receipts/s of the memory run (0: 40 %% of the pipeline phase's measured capacity, "
                             "a rate one worker sustains beside the bench's publisher and reader)")
    parser.add_argument("--latency-timeout", type=float, default=120.0,
                        help="seconds after the latency phase's publishing by which every receipt must be decided")
    parser.add_argument("--sink-rows", type=int, default=400_000)
    parser.add_argument("--stage-receipts", type=int, default=20_000)
    parser.add_argument("--scaleout-receipts", type=int, default=20_000)
    parser.add_argument("--open-pos", type=int, default=100_000)
    parser.add_argument("--blanket-receipts", type=int, default=500)
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
    failure: str | None = None
    try:
        admin.delete_topics_with_prefix(settings, "bench")
        say(f"(a) raw confluent-kafka passthrough, {args.raw_count} messages")
        results["raw_msgs_per_s"] = bench_raw(settings, args.raw_count)
        say(f"    {results['raw_msgs_per_s']:,.0f} msg/s")
        say(f"(b) bare Faust agent passthrough, {args.faust_count} messages")
        results["faust_msgs_per_s_before"] = bench_faust(settings, args.faust_count, log_dir, 1)
        results["faust_msgs_per_s"] = results["faust_msgs_per_s_before"]
        say(f"    {results['faust_msgs_per_s']:,.0f} msg/s")
        try:
            bench_pipeline(settings, args.receipts, args.latency_seconds, args.rate, args.latency_timeout,
                           log_dir, results, args.low_rate, args.steady_receipts, args.steady_rate)
        finally:
            write(out, results)  # keep what was measured if a later stage fails
        # The baseline again, after the pipeline: the machine's speed drifts over minutes, so the
        # ratio is taken against the mean of the runs before and after (both are kept).
        say(f"(b') bare Faust agent passthrough again, {args.faust_count} messages")
        results["faust_msgs_per_s_after"] = bench_faust(settings, args.faust_count, log_dir, 2)
        results["faust_msgs_per_s"] = (results["faust_msgs_per_s_before"] + results["faust_msgs_per_s_after"]) / 2
        say(f"    {results['faust_msgs_per_s_after']:,.0f} msg/s; baseline {results['faust_msgs_per_s']:,.0f} msg/s")
        write(out, results)
        say(f"    latency p50 {results['latency_p50_ms']} ms p99 {results['latency_p99_ms']} ms "
            f"({results['latency_samples']}/{results['latency_samples_expected']} samples)")
        if "latency_low_rate_p99_ms" in results:
            say(f"    at {args.low_rate:g}/s: p50 {results['latency_low_rate_p50_ms']} ms "
                f"p99 {results['latency_low_rate_p99_ms']} ms")
        bench_stages(settings, args.stage_receipts, results)
        say(f"    stage_us {results['stage_us']}")
        write(out, results)
        bench_scaleout(settings, args.scaleout_receipts, log_dir, results)
        say(f"    scale-out CPU per 1,000 events: one worker {results['scaleout_cpu_s_per_1000_1_worker']:.2f} s, "
            f"two {results['scaleout_cpu_s_per_1000_2_workers']:.2f} s (ratio {results['scaleout_cpu_ratio']:.2f})")
        write(out, results)
        say(f"sink: {args.sink_rows} rows")
        results.update(bench_sink(settings, args.sink_rows))
        write(out, results)
        bench_open_pos(settings, args.open_pos, args.blanket_receipts, 900, log_dir, results)
    except Exception as exc:
        failure = str(exc) if isinstance(exc, BenchFailed) else f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        admin.delete_topics_with_prefix(settings, settings.topic_prefix)
        if started:
            localkafka.stop(settings)
    if "pipeline_msgs_per_s" in results and "faust_msgs_per_s" in results:
        results["ratio_vs_faust"] = results["pipeline_msgs_per_s"] / results["faust_msgs_per_s"]
        results["ratio_vs_raw"] = results["pipeline_msgs_per_s"] / results["raw_msgs_per_s"]
    if failure is not None:
        results["failed"] = failure
    results = rounded(results)
    write(out, results)
    print("\n============ lotflow bench ============")
    for key, value in results.items():
        if isinstance(value, dict):
            for inner, figure in value.items():
                print(f"{key + '.' + inner:<34}{figure}")
        else:
            print(f"{key:<34}{value}")
    print(f"targets: ratio_vs_faust >= 3.0, latency_p99_ms < 50 at {args.rate:g}/s with every receipt decided, "
          "sink_rows_per_s >= 100000 (or >= 0.5 x sink_bare_insert_rows_per_s), "
          "worker_rss_end_mb <= 1.1 x worker_rss_start_mb, scaleout_cpu_ratio <= 1.1")
    print(f"written to {out}")
    if failure is not None:
        print(f"BENCH FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def rounded(results: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}


def write(out: Path, results: dict[str, Any]) -> None:
    out.write_text(json.dumps(rounded(results), indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
