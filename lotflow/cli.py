"""The ``lotflow`` command line. Every subcommand reads the one settings object."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

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

    return run_demo(get_settings(), seed=args.seed, count=args.count, faults=args.faults, rate=args.rate,
                    review=args.review)


def _learning_demo(args: argparse.Namespace) -> int:
    from lotflow.learning_run import LearningOptions, run_learning_demo

    opts = LearningOptions(count=args.count, seed=args.seed, rate=args.rate, faults=args.faults,
                           error_rate=args.error_rate, delay_s=args.delay, certainty=args.certainty,
                           reviewer_threads=args.reviewer_threads,
                           window=args.window, labels_needed=args.labels_needed, drain_s=args.drain,
                           timeout_s=args.timeout)
    return run_learning_demo(get_settings(), opts, out=args.out, plot=args.plot)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise ValueError("--password-stdin: no password on standard input")
        return line.rstrip("\r\n")
    import getpass

    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != password:
        raise ValueError("the passwords do not match")
    return password


def _users(args: argparse.Namespace) -> int:
    from lotflow.review.users import UserStore

    store = UserStore(get_settings().users_file)
    name: str = getattr(args, "name", "")  # every action but list names a user
    if args.action == "add":
        user = store.add(name, args.role, _read_password(args.password_stdin))
        print(f"user {user.username} added to {store.path} (roles: {', '.join(sorted(user.roles))})")
    elif args.action in ("disable", "enable"):
        getattr(store, args.action)(name)
        print(f"user {name} {args.action}d")
    elif args.action == "passwd":
        if store.get(name) is None:  # before asking for a password
            raise ValueError(f"no user {name!r}")
        store.set_password(name, _read_password(args.password_stdin))
        print(f"password of {name} changed")
    elif args.action == "token":
        print(store.issue_token(name, args.label))
        # On stderr: stdout carries the token alone, for a script to capture.
        print(f"lotflow users: API token for {name}: it cannot be shown again, store it now", file=sys.stderr)
    elif args.action == "revoke-tokens":
        print(f"revoked {store.revoke_tokens(name)} API tokens of {name}")
    else:
        users = store.list()
        if not users:
            print(f"no users in {store.path}")
            return 0
        rows = [("USERNAME", "ROLES", "DISABLED", "TOKENS")]
        rows += [(u.username, ",".join(sorted(u.roles)), "yes" if u.disabled else "no",
                  str(len(store.tokens(u.username)))) for u in users]
        widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _review(args: argparse.Namespace) -> int:
    from lotflow.review.server import run_review

    run_review(get_settings(), host=args.host, port=args.port, certfile=args.certfile, keyfile=args.keyfile)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from lotflow.audit import verify_chain
    from lotflow.sinks.clickhouse import connect

    settings = get_settings()
    checked, broken = verify_chain(connect(settings), settings.clickhouse_database, progress=print)
    if broken is None:
        print(f"audit chain intact: {checked} records in {settings.clickhouse_database}.audit")
        return 0
    print(f"audit chain BROKEN at partition {broken.partition}, offset {broken.offset} (record {broken.id}): "
          f"{broken.problem}; {checked} records read", file=sys.stderr)
    return 1


def _why(args: argparse.Namespace) -> int:
    from lotflow.audit import why
    from lotflow.sinks.clickhouse import connect

    settings = get_settings()
    text = "\n".join(why(connect(settings), settings.clickhouse_database, args.id))
    # reviewers' text is printed: control characters must not drive the terminal
    print("".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text))
    return 0


def _holds(args: argparse.Namespace) -> int:
    import time

    from lotflow.audit import holds
    from lotflow.sinks.clickhouse import connect

    settings = get_settings()
    held = holds(connect(settings), settings.clickhouse_database)
    print(f"{'lot':<24} {'exception':<52} {'queue':<26} {'priority':<8} age")
    now = time.time()
    for h in held:
        age_h = (now - h["since"].timestamp()) / 3600
        print(f"{h['lot_id']:<24} {h['exception_id']:<52} {h['queue']:<26} {h['priority']:<8} {age_h:.1f} h")
    print(f"{len(held)} lots held")
    return 0


def _model(args: argparse.Namespace) -> int:
    from lotflow.model_admin import run_model

    return run_model(get_settings(), args.action, node=args.node, path=getattr(args, "file", None),
                     force=getattr(args, "force", False), replay_all=getattr(args, "replay_all", False),
                     as_json=getattr(args, "json", False))


def _train(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.make_sample is not None:
        from lotflow.training import make_sample

        if args.make_sample.exists() and not args.force:
            raise ValueError(f"{args.make_sample} exists; use --force to overwrite it")
        summary = make_sample(settings, args.make_sample, args.count, args.seed, args.faults, progress=print)
        print(f"sample {args.make_sample}: {summary}")
        return 0
    from lotflow.training import run_train

    return run_train(settings, node=args.node, from_file=args.from_file, holdout=args.holdout, dry_run=args.dry_run,
                     output=args.output, force=args.force, as_json=args.json)


def _report(args: argparse.Namespace) -> int:
    from lotflow.report import run_report

    return run_report(get_settings(), node=args.node, since=args.since, as_json=args.json,
                      checkpoint=not args.no_checkpoint)


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
    review = sub.add_parser("review", help="run the review service (queues, exception detail, decisions)")
    review.add_argument("--host", default=None, help="listen address (default LOTFLOW_REVIEW_HOST)")
    review.add_argument("--port", type=int, default=None, help="listen port (default LOTFLOW_REVIEW_PORT)")
    review.add_argument("--certfile", type=Path, default=None, help="TLS certificate (PEM): serve HTTPS")
    review.add_argument("--keyfile", type=Path, default=None, help="TLS private key (PEM)")
    review.set_defaults(func=_review)
    audit = sub.add_parser("audit", help="check the audit trail")
    audit.add_argument("action", choices=["verify"], help="recompute the hash chain; exit 1 at the first broken link")
    audit.set_defaults(func=_audit)
    why_cmd = sub.add_parser("why", help="the story of a receipt, lot, exception or PO, in order")
    why_cmd.add_argument("id", help="receipt id, lot id, exception id or PO number")
    why_cmd.set_defaults(func=_why)
    holds_cmd = sub.add_parser("holds", help="lots held by an open exception, with its queue and age")
    holds_cmd.set_defaults(func=_holds)
    embedded = ("With the embedded ClickHouse engine (the default) it opens the engine itself: run it while no "
                "other process (the sink, the review service) holds it.")
    model_cmd = sub.add_parser("model", help="the nodes' learnt models: status, export, import (the checkpoints "
                               "on lotflow.model-checkpoints)",
                               epilog="Workers load a node's newest checkpoint when they (re)start, then replay the "
                                      "labels after its labels offset.")
    model_cmd.set_defaults(func=_model)
    model_actions = model_cmd.add_subparsers(dest="action", required=True)
    model_status = model_actions.add_parser("status", help="the newest checkpoint per node, the labels after it, "
                                            "and a running worker's live model")
    model_status.add_argument("--node", default="receiving", help="node shown even without a checkpoint")
    model_status.add_argument("--json", action="store_true", help="JSON instead of a table")
    model_export = model_actions.add_parser("export", help="write the newest checkpoint's learner to a file")
    model_export.add_argument("file", type=Path)
    model_export.add_argument("--node", default="receiving")
    model_export.add_argument("--force", action="store_true", help="overwrite FILE")
    model_import = model_actions.add_parser("import", help="store a learner file as the newest checkpoint "
                                            "(source import); workers load it when they (re)start",
                                            epilog="A learner file is a pickle: import only files you trust.")
    model_import.add_argument("file", type=Path)
    model_import.add_argument("--node", default="receiving")
    model_import.add_argument("--replay-all", action="store_true",
                              help="reset its labels offset to -1: workers replay the whole labels topic on top "
                                   "(a learner trained outside this cluster)")
    train_cmd = sub.add_parser("train", help="train and calibrate a node's learner from labelled history; store "
                               "it as a checkpoint (source train)",
                               epilog="--from-clickhouse reads the labels table. " + embedded)
    train_source = train_cmd.add_mutually_exclusive_group()
    train_source.add_argument("--from-clickhouse", action="store_true",
                              help="learn the labels table in labels-topic order (default); workers then replay "
                                   "only the labels after the last one used")
    train_source.add_argument("--from-file", type=Path, default=None, metavar="PATH",
                              help="CSV or Parquet, one row per historical receipt: feature columns, vendor_id, "
                                   "material_id, soft_codes (;-separated), good, [confidence], [spot_check]")
    train_source.add_argument("--make-sample", type=Path, default=None, metavar="PATH",
                              help="write a sample history file (CSV or Parquet) from the simulator, decided by a "
                                   "receiving processor in memory, and stop")
    train_cmd.add_argument("--node", default="receiving")
    train_cmd.add_argument("--holdout", type=float, default=None,
                           help="newest share held out to measure ECE/Brier on (default 0.2 with --from-file, "
                                "0 with --from-clickhouse: workers replay the held-out labels anyway)")
    train_cmd.add_argument("--dry-run", action="store_true", help="do not write the checkpoint")
    train_cmd.add_argument("--output", type=Path, default=None, metavar="FILE", help="also write the learner here")
    train_cmd.add_argument("--force", action="store_true", help="overwrite --output / --make-sample files")
    train_cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    train_cmd.add_argument("--count", type=int, default=5000, help="--make-sample: receipts to simulate")
    train_cmd.add_argument("--seed", type=int, default=7, help="--make-sample: simulation seed")
    train_cmd.add_argument("--faults", default="default", help="--make-sample: fault spec (default, learning, ...)")
    train_cmd.set_defaults(func=_train)
    report_cmd = sub.add_parser("report", help="review rate, false alarms, spot-check precision, calibration and "
                                "drift per node and vendor; PNG plots under LOTFLOW_VAR_DIR",
                                epilog="Writes report-reliability.png and report-learning-curve.png. Drift events "
                                       "come from the newest model checkpoint (Kafka). " + embedded)
    report_cmd.add_argument("--node", default=None, help="only this node (default: every node)")
    report_cmd.add_argument("--since", default=None,
                            help="only decisions/labels since: an ISO date/time (UTC) or a span such as 24h or 7d")
    report_cmd.add_argument("--json", action="store_true", help="JSON instead of tables")
    report_cmd.add_argument("--no-checkpoint", action="store_true",
                            help="do not read the model checkpoint from Kafka (drift events unknown)")
    report_cmd.set_defaults(func=_report)
    sink = sub.add_parser("sink", help="run the ClickHouse sink")
    sink.set_defaults(func=_sink)
    for name, helptext, rate in (("simulate", "publish simulated plant traffic", 0.0),
                                 ("demo", "run the whole pipeline on a local broker and print a summary", 0.0)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--seed", type=int, default=7)
        p.add_argument("--count", type=int, default=20000, help="receipts to publish")
        p.add_argument("--rate", type=float, default=rate, help="receipts per second (0: as fast as possible)")
        p.add_argument("--faults", default="default", help="'default', 'none' or name=rate,... per receipt")
        if name == "demo":
            p.add_argument("--review", action="store_true",
                           help="then leave the worker and the review service running on the demo data, with a "
                                "demo user per role (credentials printed), until Ctrl-C")
        p.set_defaults(func=_simulate if name == "simulate" else _demo)
    learning = sub.add_parser("learning-demo", help="the learning run: the pipeline, the review service and a "
                              "simulated reviewer deciding from the ground truth; learning curves per window",
                              epilog="Writes LOTFLOW_VAR_DIR/learning.json and learning.png by default.")
    learning.add_argument("--count", type=int, default=20000, help="receipts to publish")
    learning.add_argument("--seed", type=int, default=7)
    learning.add_argument("--rate", type=float, default=30.0,
                          help="receipts per second (0: as fast as possible; learning then has little time to act)")
    learning.add_argument("--faults", default="learning",
                          help="fault spec (default: the 'learning' preset, with a new pattern from halfway)")
    learning.add_argument("--error-rate", type=float, default=0.02,
                          help="share of the reviewer's answers that are wrong (deterministic per exception)")
    learning.add_argument("--delay", type=float, default=2.0,
                          help="seconds from an exception appearing to the reviewer's decision")
    learning.add_argument("--certainty", type=float, default=0.9, help="the reviewer's stated certainty, 0..1")
    learning.add_argument("--reviewer-threads", type=int, default=4,
                          help="decisions the reviewer posts at once (the API's latency bounds one at a time)")
    learning.add_argument("--window", type=int, default=1000, help="receipts per window of the learning curves")
    learning.add_argument("--labels-needed", type=int, default=2000,
                          help="label count after which the final figures are measured")
    learning.add_argument("--drain", type=float, default=60.0,
                          help="seconds the reviewer may still empty the queue once every receipt is decided")
    learning.add_argument("--timeout", type=float, default=None, help="seconds for the whole run (default: "
                          "from --count and --rate)")
    learning.add_argument("--out", type=Path, default=None, help="figures (JSON); default var/learning.json")
    learning.add_argument("--plot", type=Path, default=None, help="learning curves (PNG); default var/learning.png")
    learning.set_defaults(func=_learning_demo)
    users = sub.add_parser("users", help="manage the users, roles and API tokens of the review service",
                           epilog="The users file: LOTFLOW_REVIEW_USERS_FILE (default LOTFLOW_VAR_DIR/"
                                  "review-users.json). Safe to use while the service runs.")
    users.set_defaults(func=_users)
    actions = users.add_subparsers(dest="action", required=True)
    from_stdin = "read the password from one line of standard input (default: prompt twice)"
    add = actions.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--role", action="append", required=True,
                     help="repeatable: receiving, supplier_quality, qc_technician, operations_analyst, "
                          "manufacturing_engineering or admin (every queue)")
    add.add_argument("--password-stdin", action="store_true", help=from_stdin)
    for action, helptext in (("disable", "disable a user (their API tokens stop working too)"),
                             ("enable", "enable a disabled user"),
                             ("revoke-tokens", "revoke every API token of a user")):
        actions.add_parser(action, help=helptext).add_argument("name")
    passwd = actions.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help=from_stdin)
    token = actions.add_parser("token", help="issue an API token (printed once)")
    token.add_argument("name")
    token.add_argument("--label", default="", help="what the token is for")
    actions.add_parser("list", help="list the users (never a password hash or token)")
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
