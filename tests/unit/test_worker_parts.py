"""Small pure parts of the worker: due-time index, health, fault injection, state units, codec."""

from __future__ import annotations

import asyncio

import pytest

from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams.faults import crash_injector
from lotflow.streams.health import Health
from lotflow.streams.producer import Encoder
from lotflow.streams.state import DictState, StateTooLarge, StateUnit
from lotflow.streams.timers import DueIndex
from lotflow.streams.transport import _Resumed
from lotflow.verification.node import Evaluation, Reason, Route, Severity, Verdict
from lotflow.verification.outputs import InputRef, Subject, outputs_for

from .receiving_fixtures import receipt


def test_due_index_returns_only_what_is_due_in_time_order() -> None:
    index = DueIndex()
    for due, item in [(30, "c"), (10, "a"), (20, "b"), (10, "a2")]:
        index.push(due, item)
    assert index.pop_due(5) == []
    assert index.pop_due(20) == ["a", "a2", "b"]
    assert len(index) == 1 and index.next_due() == 30


def test_health_fails_while_commits_fail_or_input_waits_without_progress() -> None:
    now = [100.0]
    health = Health(stall_timeout_s=60, clock=lambda: now[0])
    health.observe_assignment(4)
    assert health.check(None)[0]
    assert not health.check(commit_failing_since=95.0)[0]
    health.observe_lag(0)
    now[0] += 120
    assert health.check(None)[0]  # idle with nothing to read is healthy
    health.observe_lag(5)
    ok, detail = health.check(None)
    assert not ok and "5 input records waiting" in detail["problems"][0]
    health.batch_done()
    assert health.check(None)[0]


def test_health_fails_when_no_partition_is_assigned_for_the_stall_timeout() -> None:
    now = [100.0]
    health = Health(stall_timeout_s=60, clock=lambda: now[0])
    now[0] += 30
    assert health.check(None)[0] and health.unassigned_for() == 30  # joining at start
    health.observe_assignment(4)
    now[0] += 100
    assert health.check(None)[0] and health.unassigned_for() == 0
    health.observe_assignment(0)  # out of the group
    now[0] += 61
    ok, detail = health.check(None)
    assert not ok and "no input partition assigned for 61s" in detail["problems"][0]
    health.observe_assignment(2)
    assert health.check(None)[0]


def test_health_fails_when_handled_input_stays_uncommitted_for_the_stall_timeout() -> None:
    now = [100.0]
    health = Health(stall_timeout_s=60, clock=lambda: now[0])
    health.observe_assignment(4)
    health.observe_offsets(handled=500, committed=300)
    now[0] += 50
    health.observe_offsets(handled=900, committed=700)  # commits move: the clock starts again
    now[0] += 50
    assert health.check(None)[0] and health.uncommitted_for() == 50
    health.observe_offsets(handled=900, committed=900)  # caught up
    now[0] += 500
    assert health.check(None)[0] and health.uncommitted_for() == 0
    health.observe_offsets(handled=1200, committed=900)
    now[0] += 30
    health.observe_offsets(handled=1500, committed=900)  # handled moves on, commits do not
    now[0] += 31
    ok, detail = health.check(None)
    assert not ok and detail["uncommitted_inputs"] == 600
    assert "600 handled input records not committed" in detail["problems"][0]
    assert "not moved for 61s" in detail["problems"][0]


def test_fault_injection_names_a_known_point() -> None:
    assert crash_injector(None) is None
    with pytest.raises(ValueError, match="not one of"):
        crash_injector("somewhere")
    crash = crash_injector("after_commit:3")
    assert crash is not None
    crash("before_commit")  # other points never kill
    crash("after_commit")
    crash("after_commit")  # the third time would


def test_a_state_unit_changes_nothing_until_applied_and_refuses_oversized_values() -> None:
    table = DictState()
    unit = StateUnit(max_value_bytes=100)
    unit.put(table, 0, "k", {"v": [1, 2]})
    assert table.get("k") is None and unit.get(table, "k") == {"v": [1, 2]}
    unit.apply(unit.encode())
    copy = StateUnit(100).get(table, "k")
    copy["v"].append(3)
    assert table.get("k") == {"v": [1, 2]}  # reads are private copies
    big = StateUnit(100)
    big.put(table, 0, "k", {"v": "x" * 200})
    with pytest.raises(StateTooLarge):
        big.encode()
    assert table.get("k") == {"v": [1, 2]}


def test_epoch_millis_codec_reads_the_same_bytes_as_plain_ints() -> None:
    source = schema_source(None)
    fast = AvroCodec(source, "x", "lotflow.plant.Receipt", epoch_millis=True)
    plain = AvroCodec(source, "x", "lotflow.plant.Receipt")
    record = receipt()
    assert fast.encode(record) == plain.encode(record)
    assert fast.decode(plain.encode(record))["received_at"] == record["received_at"]


@pytest.mark.parametrize("decision", ["VERIFIED", "EXCEPTION"])
def test_a_decisions_shared_fields_are_encoded_once_to_the_same_bytes(decision: str) -> None:
    encoder = Encoder(Settings(), schema_source(None))
    reason = Reason("QUANTITY_OVER", "line 1: received 105 kg of 100 ordered", Severity.BLOCK, {"po_line": "1"})
    route = None if decision == "VERIFIED" else Route("receiving", "Recount.")
    evaluation = Evaluation((reason,), {"n_block": 1.0}, Verdict(decision, 0.42, "HIGH", route), "prior-1")
    subject = Subject(node="receiving", key="PO-1", subject_id="R-1", refs=[InputRef("plant.receipts", 0, 7)],
                      event_time_ms=1_700_000_000_000, vendor_id="V-1", lot_ids=["L-1", "L-2"],
                      lot_attributes=[{"vendor_id": "V-1"}, {"vendor_id": "V-1"}],
                      verified_lines=[{"po_line": 1, "material_id": "M-1", "quantity": 5.0, "unit": "kg",
                                       "vendor_lot": "L-1"}])
    outputs = outputs_for(subject, evaluation, 1_700_000_001_000)
    together = encoder.encode_all(outputs)
    alone = [encoder.encode(kind, key, record) for kind, key, record in outputs]
    assert together == alone
    assert len(together) == 4  # decision, audit, a lot event per lot
    schema = "VerifiedRecord" if decision == "VERIFIED" else "ExceptionRecord"
    main = AvroCodec(schema_source(None), "x", f"lotflow.verification.{schema}")
    assert main.decode(together[0].value)["reasons"][0]["code"] == "QUANTITY_OVER"


def test_a_stepped_coroutine_resumes_where_it_waited_and_takes_cancellation() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[int] = loop.create_future()

        async def callback() -> int:
            return await gate + 1

        coro = callback()
        pending = coro.send(None)  # runs until it waits on the gate
        task = asyncio.ensure_future(_Resumed(coro, pending))
        await asyncio.sleep(0)
        assert not task.done()
        gate.set_result(41)
        assert await task == 42

        blocked: asyncio.Future[int] = loop.create_future()

        async def waits_forever() -> int:
            return await blocked

        coro = waits_forever()
        task = asyncio.ensure_future(_Resumed(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert blocked.cancelled()  # the cancellation reached what the coroutine waited on

    asyncio.run(scenario())


def test_observe_all_gives_the_buckets_count_and_sum_of_observing_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from lotflow.metrics import observe_all

    values = [0.0, 0.004, 0.005, 0.0051, 0.7, 2.5, 9.9, 10.0, 1e9, float("nan")]
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("x_seconds", "x", ["node"], registry=one).labels("n")
    h2 = Histogram("x_seconds", "x", ["node"], registry=many).labels("n")
    for v in values:
        h1.observe(v)
    observe_all(h2, values)
    observe_all(h2, [])
    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], str]]:
        return [(s.name, s.labels, repr(s.value)) for metric in registry.collect() for s in metric.samples
                if not s.name.endswith("_created")]

    assert samples(one) == samples(many) and len(samples(one)) > 10


def test_a_key_created_and_deleted_within_one_batch_writes_no_changelog_record() -> None:
    class Sender:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, bytes | None]] = []

        def send_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
            self.sent.append((key, value))

    table, sender = DictState(encoded=True), Sender()
    table.apply(0, "kept", {"v": 1}, b'{"v":1}')
    table.apply(0, "gone", {"v": 2}, b'{"v":2}')
    assert table.flush_to(sender) == 2
    table.apply(0, "brief", {"v": 3}, b'{"v":3}')  # created and deleted in one batch: nothing to write
    table.apply(0, "brief", None, None)
    table.apply(0, "gone", None, None)  # existed before the batch: a tombstone
    table.apply(0, "again", None, None)  # never existed: nothing
    table.apply(0, "kept", {"v": 4}, b'{"v":4}')
    assert table.flush_to(sender) == 2
    assert sender.sent[2:] == [(b'"gone"', None), (b'"kept"', b'{"v":4}')]
    assert "brief" not in table and "gone" not in table and table.get("kept") == {"v": 4}


def test_the_worker_consumer_reads_committed_and_the_broker_holds_its_empty_fetches_briefly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Faust builds the aiokafka consumer with read_uncommitted and a 1,500 ms fetch wait; the
    # worker's consumer thread overrides both before start() hands them to the fetcher.
    import types

    from faust.transport.drivers import aiokafka as faust_aiokafka

    from lotflow.streams import transport

    made = types.SimpleNamespace(_isolation_level="read_uncommitted", _fetch_max_wait_ms=1500)
    monkeypatch.setattr(faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer",
                        lambda self, _transport: made)
    thread = object.__new__(transport._ReadCommittedThread)
    assert thread._create_worker_consumer(None) is made
    assert made._isolation_level == "read_committed"
    assert made._fetch_max_wait_ms == transport.FETCH_MAX_WAIT_MS == 50
