"""Users, roles and API tokens of the review service.

Each non-admin role is the specialist queue of the same name (:class:`lotflow.verification.queues.Queue`):
a user sees and decides the exceptions of the queues of their roles; an admin sees and decides all.

Users live in one JSON file. The embedded default deployment keeps it under ``var/``
(``var_dir/review-users.json``); a production deployment points ``LOTFLOW_REVIEW_USERS_FILE`` at a
file on a persistent volume or a mounted secret. ``lotflow users ...`` changes the file while the
service runs: writes are atomic (a temporary file in the same directory, then ``os.replace``; mode
0600) and serialised by ``flock`` on a sibling ``.lock`` file, and every reader reloads when the
file changes (one ``stat`` per call).

Passwords are stored as argon2id hashes only. An API token is shown once when issued; the file keeps
its SHA-256 digest, label and creation time. Nothing here logs or reprs a password or a token.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from lotflow.verification.queues import Queue

__all__ = ["MIN_PASSWORD_LENGTH", "TOKEN_PREFIX", "Role", "TokenInfo", "User", "UserStore", "parse_roles"]

log = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 10
TOKEN_PREFIX = "lft_"
_USERNAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_MAX_LABEL_LENGTH = 200
_FORMAT_VERSION = 1


class Role(StrEnum):
    RECEIVING = "receiving"
    SUPPLIER_QUALITY = "supplier_quality"
    QC_TECHNICIAN = "qc_technician"
    OPERATIONS_ANALYST = "operations_analyst"
    MANUFACTURING_ENGINEERING = "manufacturing_engineering"
    ADMIN = "admin"

    @property
    def title(self) -> str:  # type: ignore[override]
        return _TITLES[self]

    @property
    def queue(self) -> Queue | None:
        """The queue this role works (None for admin, who works every queue)."""
        return _QUEUE_OF_ROLE.get(self)


_TITLES = {
    Role.RECEIVING: "Receiving technician",
    Role.SUPPLIER_QUALITY: "Supplier-quality engineer",
    Role.QC_TECHNICIAN: "QC technician",
    Role.OPERATIONS_ANALYST: "Operations analyst",
    Role.MANUFACTURING_ENGINEERING: "Manufacturing engineer",
    Role.ADMIN: "Administrator",
}
# Fails at import if a queue is added without its role.
_QUEUE_OF_ROLE = {Role(queue.value): queue for queue in Queue}


@dataclass(frozen=True)
class User:
    username: str
    roles: frozenset[Role]
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def queues(self) -> frozenset[Queue]:
        """The queues this user may see and decide."""
        if self.is_admin:
            return frozenset(Queue)
        return frozenset(q for q in (role.queue for role in self.roles) if q is not None)

    def may_decide(self, queue: str) -> bool:
        return queue in self.queues


@dataclass(frozen=True)
class TokenInfo:
    """What is kept of an API token: never the token itself."""

    label: str
    created: datetime


def parse_roles(roles: Iterable[Role | str]) -> frozenset[Role]:
    parsed = set()
    for role in roles:
        try:
            parsed.add(Role(role))
        except ValueError:
            raise ValueError(f"unknown role {role!r} (one of: {', '.join(Role)})") from None
    if not parsed:
        raise ValueError("a user needs at least one role")
    return frozenset(parsed)


def _check_username(username: str) -> None:
    if not _USERNAME.fullmatch(username):
        raise ValueError(f"bad username {username!r}: 1 to 64 of the characters A-Z a-z 0-9 . _ @ -")


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password is too short (at least {MIN_PASSWORD_LENGTH} characters)")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# The file's contents: {"version": 1, "users": {name: {"roles": [...], "disabled": bool,
# "password_hash": argon2 string, "tokens": [{"digest": hex, "label": str, "created": iso}]}}}
_Data = dict[str, Any]


class UserStore:
    """The users of the review service, in a JSON file that several processes may share."""

    def __init__(self, path: Path, hasher: PasswordHasher | None = None) -> None:
        self.path = Path(path)
        self.hasher = hasher or PasswordHasher()
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.RLock()  # the web app calls from several threads
        self._stamp: tuple[int, int, int, int] | None = None
        self._data: _Data = {"version": _FORMAT_VERSION, "users": {}}
        self._by_digest: dict[str, str] = {}
        self._dummy_hash: str | None = None

    def __repr__(self) -> str:
        return f"UserStore(path={str(self.path)!r})"

    # --- reading ---------------------------------------------------------------------------

    def get(self, username: str) -> User | None:
        record = self._users().get(username)
        return None if record is None else _user(username, record)

    def list(self) -> builtins.list[User]:
        return [_user(name, record) for name, record in sorted(self._users().items())]

    def tokens(self, username: str) -> builtins.list[TokenInfo]:
        record = self._existing(self._users(), username)
        return [TokenInfo(t["label"], datetime.fromisoformat(t["created"])) for t in record["tokens"]]

    def authenticate_password(self, username: str, password: str) -> User | None:
        """The user, if enabled and the password is theirs; else None, in about the same time."""
        record = self._users().get(username)
        if record is None:
            # Verify anyway so the response time does not tell which usernames exist.
            self._verify(self._dummy(), password)
            return None
        stored = record["password_hash"]
        if not self._verify(stored, password) or record["disabled"]:
            return None
        if self.hasher.check_needs_rehash(stored):
            self._rehash(username, stored, password)
        return _user(username, record)

    def authenticate_token(self, token: str) -> User | None:
        """The enabled user who holds this API token, else None."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        # The lookup is by SHA-256 digest: what an attacker controls never meets the stored value
        # byte by byte, so its timing reveals nothing useful.
        with self._mutex:
            self._refresh()
            username = self._by_digest.get(_digest(token))
            users = self._data["users"]
        if username is None or users[username]["disabled"]:
            return None
        return _user(username, users[username])

    # --- changing ------------------------------------------------------------------------------

    def add(self, username: str, roles: Iterable[Role | str], password: str) -> User:
        _check_username(username)
        parsed = parse_roles(roles)
        _check_password(password)
        password_hash = self.hasher.hash(password)  # outside the file lock: hashing is slow on purpose

        def change(users: _Data) -> None:
            if username in users:
                raise ValueError(f"user {username!r} already exists")
            users[username] = {"roles": sorted(parsed), "disabled": False,
                               "password_hash": password_hash, "tokens": []}

        self._mutate(change)
        return User(username, parsed, disabled=False)

    def disable(self, username: str) -> None:
        self._set_disabled(username, True)

    def enable(self, username: str) -> None:
        self._set_disabled(username, False)

    def set_password(self, username: str, password: str) -> None:
        _check_password(password)
        self._existing(self._users(), username)  # a clear error before the slow hash
        password_hash = self.hasher.hash(password)

        def change(users: _Data) -> None:
            self._existing(users, username)["password_hash"] = password_hash

        self._mutate(change)

    def issue_token(self, username: str, label: str = "") -> str:
        """A new API token for the user. Returned this once: only its digest is kept."""
        if len(label) > _MAX_LABEL_LENGTH or not label.isprintable():
            raise ValueError(f"bad token label: at most {_MAX_LABEL_LENGTH} printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = {"digest": _digest(token), "label": label,
                 "created": datetime.now(UTC).isoformat(timespec="seconds")}

        def change(users: _Data) -> None:
            self._existing(users, username)["tokens"].append(entry)

        self._mutate(change)
        return token

    def revoke_tokens(self, username: str) -> int:
        """Revoke every API token of the user; returns how many there were."""
        revoked = 0

        def change(users: _Data) -> None:
            nonlocal revoked
            record = self._existing(users, username)
            revoked = len(record["tokens"])
            record["tokens"] = []

        self._mutate(change)
        return revoked

    # --- internals --------------------------------------------------------------------------------

    @staticmethod
    def _existing(users: _Data, username: str) -> dict[str, Any]:
        record = users.get(username)
        if record is None:
            raise ValueError(f"no user {username!r}")
        return record

    def _set_disabled(self, username: str, disabled: bool) -> None:
        def change(users: _Data) -> None:
            self._existing(users, username)["disabled"] = disabled

        self._mutate(change)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _rehash(self, username: str, stored: str, password: str) -> None:
        new_hash = self.hasher.hash(password)

        def change(users: _Data) -> None:
            record = users.get(username)
            if record is not None and record["password_hash"] == stored:  # not changed meanwhile
                record["password_hash"] = new_hash

        try:
            self._mutate(change)
        except OSError as exc:  # a read-only file (a mounted secret): logging in matters more
            log.warning("could not upgrade a password hash in %s: %s", self.path, exc.strerror)

    def _users(self) -> _Data:
        with self._mutex:
            self._refresh()
            return self._data["users"]

    def _refresh(self) -> None:
        """Reload the file if it changed since it was read (a new inode after each replace)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._publish({"version": _FORMAT_VERSION, "users": {}}, None)
            return
        if _stamp(st) == self._stamp:
            return
        with open(self.path, "rb") as f:
            # The stamp of the file actually read: a replace after the stat above is seen next call.
            stamp = _stamp(os.fstat(f.fileno()))
            raw = f.read()
        try:
            data = json.loads(raw)
            if not (isinstance(data, dict) and data.get("version") == _FORMAT_VERSION
                    and isinstance(data.get("users"), dict)):
                raise ValueError("unknown format")
        except ValueError as exc:
            raise ValueError(f"{self.path} is not a lotflow review users file ({exc})") from None
        self._publish(data, stamp)

    def _publish(self, data: _Data, stamp: tuple[int, int, int, int] | None) -> None:
        self._data = data
        self._stamp = stamp
        self._by_digest = {token["digest"]: name for name, record in data["users"].items()
                           for token in record["tokens"]}

    def _mutate(self, change: Callable[[_Data], None]) -> None:
        """Apply ``change`` to the users under the file lock and write the result atomically."""
        with self._mutex, self._file_lock():
            self._refresh()
            data = copy.deepcopy(self._data)  # published data stays untouched if change or write fails
            change(data["users"])
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    os.fchmod(f.fileno(), 0o600)  # mkstemp's default, made explicit
                    json.dump(data, f, indent=2, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.path.parent)
            self._publish(data, _stamp(os.stat(self.path)))

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _user(username: str, record: dict[str, Any]) -> User:
    return User(username, frozenset(Role(r) for r in record["roles"]), bool(record["disabled"]))


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
