import io
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher

from lotflow.cli import main
from lotflow.review.users import Role, User, UserStore
from lotflow.settings import get_settings
from lotflow.verification.queues import Queue

PASSWORD = "correct horse battery"


def cheap_hasher(time_cost: int = 1) -> PasswordHasher:
    # The default parameters take ~50 ms a hash on purpose; tests need many.
    return PasswordHasher(time_cost=time_cost, memory_cost=1024, parallelism=1)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "review-users.json"


@pytest.fixture
def store(path: Path) -> UserStore:
    return UserStore(path, hasher=cheap_hasher())


def test_a_user_logs_in_with_their_password_only(store: UserStore) -> None:
    added = store.add("ana.k@plant-1", [Role.RECEIVING], PASSWORD)
    assert added == User("ana.k@plant-1", frozenset({Role.RECEIVING}), disabled=False)
    assert store.authenticate_password("ana.k@plant-1", PASSWORD) == added
    assert store.authenticate_password("ana.k@plant-1", PASSWORD + "x") is None
    assert store.authenticate_password("ana.k@plant-1", "") is None
    assert store.authenticate_password("nobody", PASSWORD) is None
    assert store.get("ana.k@plant-1") == added
    assert store.get("nobody") is None


def test_an_unknown_user_still_costs_a_password_verification(path: Path) -> None:
    calls = []

    class Counting(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
            calls.append(hash)
            return super().verify(hash, password)

    store = UserStore(path, hasher=Counting(time_cost=1, memory_cost=1024, parallelism=1))
    assert store.authenticate_password("nobody", PASSWORD) is None
    assert store.authenticate_password("not a valid name!", PASSWORD) is None
    assert len(calls) == 2


def test_a_disabled_user_can_not_log_in_until_enabled(store: UserStore) -> None:
    store.add("bo", ["qc_technician"], PASSWORD)
    token = store.issue_token("bo", "bench scale")
    store.disable("bo")
    assert store.get("bo") == User("bo", frozenset({Role.QC_TECHNICIAN}), disabled=True)
    assert store.authenticate_password("bo", PASSWORD) is None
    assert store.authenticate_token(token) is None
    store.enable("bo")
    assert store.authenticate_password("bo", PASSWORD) is not None
    assert store.authenticate_token(token) is not None


def test_set_password_replaces_the_old_one(store: UserStore) -> None:
    store.add("bo", ["admin"], PASSWORD)
    store.set_password("bo", "another long password")
    assert store.authenticate_password("bo", PASSWORD) is None
    assert store.authenticate_password("bo", "another long password") is not None
    with pytest.raises(ValueError, match="no user 'nobody'"):
        store.set_password("nobody", "another long password")
    with pytest.raises(ValueError, match="too short"):
        store.set_password("bo", "short")


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "ana/../x", "émile", "ana\n", "a:b"])
def test_bad_usernames_are_refused(store: UserStore, name: str) -> None:
    with pytest.raises(ValueError, match="bad username"):
        store.add(name, ["receiving"], PASSWORD)


def test_bad_input_is_refused_with_a_clear_message(store: UserStore) -> None:
    store.add("ana", ["receiving"], PASSWORD)
    with pytest.raises(ValueError, match="user 'ana' already exists"):
        store.add("ana", ["receiving"], PASSWORD)
    with pytest.raises(ValueError, match="at least 10 characters"):
        store.add("bo", ["receiving"], "123456789")
    with pytest.raises(ValueError, match="at least one role"):
        store.add("bo", [], PASSWORD)
    with pytest.raises(ValueError, match=r"unknown role 'boss'.*supplier_quality"):
        store.add("bo", ["boss"], PASSWORD)
    for change in (store.disable, store.enable, store.revoke_tokens, store.issue_token, store.tokens):
        with pytest.raises(ValueError, match="no user 'bo'"):
            change("bo")
    with pytest.raises(ValueError, match="bad token label"):
        store.issue_token("ana", "line\nbreak")
    assert [u.username for u in store.list()] == ["ana"]


def test_api_tokens_are_shown_once_and_can_be_revoked(store: UserStore) -> None:
    store.add("ana", ["receiving"], PASSWORD)
    store.add("bo", ["admin"], PASSWORD)
    first, second = store.issue_token("ana", "scanner 1"), store.issue_token("ana", "scanner 2")
    bo_token = store.issue_token("bo")
    assert first.startswith("lft_") and len(first) > 40 and first != second
    assert store.authenticate_token(first) == store.authenticate_token(second) == store.get("ana")
    assert store.authenticate_token(bo_token) == store.get("bo")
    assert store.authenticate_token(first + "x") is None
    assert store.authenticate_token("not-a-token") is None
    assert [t.label for t in store.tokens("ana")] == ["scanner 1", "scanner 2"]
    assert store.revoke_tokens("ana") == 2
    assert store.authenticate_token(first) is None and store.authenticate_token(second) is None
    assert store.authenticate_token(bo_token) is not None
    assert store.tokens("ana") == []


def test_roles_are_queues_and_admin_sees_every_queue() -> None:
    assert {r.value for r in Role} == {q.value for q in Queue} | {"admin"}
    assert Role.SUPPLIER_QUALITY.title == "Supplier-quality engineer"
    assert Role.ADMIN.title == "Administrator" and Role.ADMIN.queue is None
    analyst = User("cy", frozenset({Role.OPERATIONS_ANALYST, Role.QC_TECHNICIAN}))
    assert analyst.queues == {Queue.OPERATIONS_ANALYST, Queue.QC_TECHNICIAN}
    assert analyst.may_decide("operations_analyst") and analyst.may_decide(Queue.QC_TECHNICIAN)
    assert not analyst.may_decide("receiving") and not analyst.may_decide("admin")
    assert not analyst.is_admin
    admin = User("root", frozenset({Role.ADMIN}))
    assert admin.is_admin and admin.queues == frozenset(Queue)
    assert all(admin.may_decide(q.value) for q in Queue)


def test_the_file_is_private_and_holds_no_password_or_token(store: UserStore, path: Path) -> None:
    store.add("ana", ["receiving"], PASSWORD)
    token = store.issue_token("ana", "scanner")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert PASSWORD not in text and token not in text and token.removeprefix("lft_") not in text
    record = json.loads(text)["users"]["ana"]
    assert record["password_hash"].startswith("$argon2id$")
    assert set(record["tokens"][0]) == {"digest", "label", "created"}
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert PASSWORD not in repr(store) and PASSWORD not in repr(store.list())


def test_a_second_store_on_the_same_file_sees_every_change(store: UserStore, path: Path) -> None:
    other = UserStore(path, hasher=cheap_hasher())
    assert other.list() == []
    store.add("ana", ["receiving"], PASSWORD)
    assert other.authenticate_password("ana", PASSWORD) is not None
    token = other.issue_token("ana")
    assert store.authenticate_token(token) is not None
    other.disable("ana")
    assert store.get("ana") is not None and store.get("ana").disabled  # type: ignore[union-attr]
    assert store.authenticate_token(token) is None


def test_concurrent_writers_lose_no_change(store: UserStore, path: Path) -> None:
    store.add("ana", ["receiving"], PASSWORD)
    # One store per thread: only the file lock keeps their read-modify-write cycles apart.
    stores = [UserStore(path, hasher=cheap_hasher()) for _ in range(4)]
    threads = [threading.Thread(target=lambda s=s: [s.issue_token("ana") for _ in range(10)]) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.tokens("ana")) == 40


def test_an_outdated_hash_is_upgraded_at_login(path: Path) -> None:
    UserStore(path, hasher=cheap_hasher(time_cost=1)).add("ana", ["receiving"], PASSWORD)
    before = json.loads(path.read_text())["users"]["ana"]["password_hash"]
    stronger = UserStore(path, hasher=cheap_hasher(time_cost=2))
    assert stronger.authenticate_password("ana", PASSWORD) is not None
    after = json.loads(path.read_text())["users"]["ana"]["password_hash"]
    assert after != before and "t=2" in after
    assert stronger.authenticate_password("ana", PASSWORD) is not None


def test_a_file_that_is_not_a_users_file_is_a_clear_error(path: Path) -> None:
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a lotflow review users file"):
        UserStore(path).list()


# --- lotflow users -------------------------------------------------------------------


@pytest.fixture
def var_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LOTFLOW_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("LOTFLOW_REVIEW_USERS_FILE", raising=False)
    get_settings.cache_clear()  # settings are read once per process
    yield tmp_path
    get_settings.cache_clear()


def users(monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["users", *args])


def test_cli_round_trip(var_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert users(monkeypatch, "list") == 0
    assert "no users" in capsys.readouterr().out
    assert users(monkeypatch, "add", "ana", "--role", "receiving", "--role", "qc_technician",
                 "--password-stdin", stdin=PASSWORD + "\n") == 0
    assert users(monkeypatch, "add", "root", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n") == 0
    capsys.readouterr()
    assert users(monkeypatch, "token", "ana", "--label", "scanner") == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("lft_") and "cannot be shown again" in err

    store = UserStore(var_dir / "review-users.json")
    ana = store.authenticate_password("ana", PASSWORD)
    assert ana is not None and ana.roles == {Role.RECEIVING, Role.QC_TECHNICIAN}
    assert store.authenticate_token(token) == ana

    assert users(monkeypatch, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["USERNAME", "ROLES", "DISABLED", "TOKENS"]
    assert lines[1].split() == ["ana", "qc_technician,receiving", "no", "1"]
    assert lines[2].split() == ["root", "admin", "no", "0"]
    assert "argon2" not in "\n".join(lines)

    assert users(monkeypatch, "disable", "ana") == 0
    assert store.authenticate_token(token) is None
    assert users(monkeypatch, "enable", "ana") == 0
    assert users(monkeypatch, "passwd", "ana", "--password-stdin", stdin="a new long password\r\n") == 0
    assert store.authenticate_password("ana", "a new long password") is not None
    assert users(monkeypatch, "revoke-tokens", "ana") == 0
    assert "revoked 1 API tokens" in capsys.readouterr().out
    assert store.authenticate_token(token) is None


def test_cli_errors_are_clear(var_dir: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["disable", "nobody"], ["token", "nobody"], ["passwd", "nobody", "--password-stdin"]):
        assert users(monkeypatch, *args, stdin=PASSWORD + "\n") == 2
        assert "lotflow users: error: no user 'nobody'" in capsys.readouterr().err
    assert users(monkeypatch, "add", "ana", "--role", "boss", "--password-stdin", stdin=PASSWORD + "\n") == 2
    assert "unknown role 'boss'" in capsys.readouterr().err
    assert users(monkeypatch, "add", "ana", "--role", "admin", "--password-stdin", stdin="short\n") == 2
    assert "too short" in capsys.readouterr().err
    assert users(monkeypatch, "add", "ana", "--role", "admin", "--password-stdin") == 2
    assert "no password on standard input" in capsys.readouterr().err
    answers = iter([PASSWORD, PASSWORD + "!"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert users(monkeypatch, "add", "ana", "--role", "admin") == 2
    assert "do not match" in capsys.readouterr().err
    assert not (var_dir / "review-users.json").exists()


def test_cli_uses_the_configured_users_file(var_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = var_dir / "secret" / "users.json"
    monkeypatch.setenv("LOTFLOW_REVIEW_USERS_FILE", str(elsewhere))
    get_settings.cache_clear()
    answers = iter([PASSWORD, PASSWORD])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert users(monkeypatch, "add", "ana", "--role", "admin") == 0
    assert UserStore(elsewhere).get("ana") is not None
    assert not (var_dir / "review-users.json").exists()


def test_cli_help_names_every_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["users", "add", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(role.value in out for role in Role)
