"""The ``lotflow`` command line. Every subcommand reads the one settings object."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lotflow.settings import get_settings

__all__ = ["main"]


def _kafka(args: argparse.Namespace) -> int:
    from lotflow import localkafka

    settings = get_settings()
    if args.action == "start":
        if args.sasl_port is not None:
            settings = settings.model_copy(update={"kafka_sasl_port": args.sasl_port})
        localkafka.start(settings)
    elif args.action == "stop":
        localkafka.stop(settings)
    else:
        print(json.dumps(localkafka.status(settings), indent=2, default=str))
    return 0


def _topics(args: argparse.Namespace) -> int:
    from lotflow.admin import create_topics

    created = create_topics(get_settings())
    print(f"topics ready ({len(created)} created)")
    return 0


def _db(args: argparse.Namespace) -> int:
    from lotflow.sinks.clickhouse import connect
    from lotflow.sinks.migrations import migrate

    settings = get_settings()
    applied = migrate(connect(settings), settings.clickhouse_database)
    print(f"database {settings.clickhouse_database}: applied migrations {applied or 'none (up to date)'}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    # Faust reads the event-loop choice from argv when it is imported: set it first.
    sys.argv = ["lotflow", "-L", "uvloop", "worker", "-l", args.loglevel,
                "--web-port", str(settings.worker_web_port), "--web-host", settings.worker_web_host]
    from lotflow.streams.worker import create_worker

    create_worker(settings, membership_watchdog_thread=True).main()
    return 0


def _sink(args: argparse.Namespace) -> int:
    from lotflow.sinks.clickhouse import run_sink

    run_sink(get_settings())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from lotflow.simulator.faults import parse_fault_spec
    from lotflow.simulator.publish import publish

    mix = parse_fault_spec(args.faults)
    report = publish(get_settings(), args.seed, args.count, mix, args.rate, progress=print)
    print(report)
    delivered = sum(report.per_topic.values())
    print(f"delivered {delivered} records, failed {report.failed}, redelivered {report.redelivered}")
    if report.failed:
        print(f"lotflow simulate: error: {report.failed} records were not delivered "
              f"(first: {report.errors[:1]})", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lotflow.demo import run_demo

    return run_demo(get_settings(), seed=args.seed, count=args.count, faults=args.faults, rate=args.rate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lotflow", description=__doc__,
                                     epilog="Configuration: LOTFLOW_* environment variables (see README).")
    sub = parser.add_subparsers(dest="command", required=True)
    kafka = sub.add_parser("kafka", help="run a local Apache Kafka broker (dev, demo, CI)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--sasl-port", type=int, default=None, metavar="PORT",
                       help="start: also serve SASL_PLAINTEXT (PLAIN, SCRAM-SHA-256/512) on PORT for the user "
                            "LOTFLOW_KAFKA_SASL_USERNAME / LOTFLOW_KAFKA_SASL_PASSWORD (default "
                            "LOTFLOW_KAFKA_SASL_PORT; 0: none)")
    kafka.set_defaults(func=_kafka)
    topics = sub.add_parser("topics", help="manage topics")
    topics.add_argument("action", choices=["create"], help="create every declared topic (idempotent)")
    topics.set_defaults(func=_topics)
    db = sub.add_parser("db", help="manage the ClickHouse schema")
    db.add_argument("action", choices=["migrate"], help="apply pending migrations (idempotent)")
    db.set_defaults(func=_db)
    worker = sub.add_parser("worker", help="run the verification worker (Faust)")
    worker.add_argument("--loglevel", default="warn", choices=["debug", "info", "warn", "error"])
    worker.set_defaults(func=_worker)
    sink = sub.add_parser("sink", help="run the ClickHouse sink")
    sink.set_defaults(func=_sink)
    for name, helptext, rate in (("simulate", "publish simulated plant traffic", 0.0),
                                 ("demo", "run the whole pipeline on a local broker and print a summary", 0.0)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--seed", type=int, default=7)
        p.add_argument("--count", type=int, default=20000, help="receipts to publish")
        p.add_argument("--rate", type=float, default=rate, help="receipts per second (0: as fast as possible)")
        p.add_argument("--faults", default="default", help="'default', 'none' or name=rate,... per receipt")
        p.set_defaults(func=_simulate if name == "simulate" else _demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, TimeoutError, FileNotFoundError, RuntimeError) as exc:
        print(f"lotflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
