"""Sessions, CSRF tokens and login rate limits of the review service.

Sessions are server-side: the cookie holds a random token (HttpOnly, SameSite=Strict, Secure
when served over TLS), the process holds who it is, its CSRF token and when it expires, so a
logout or a disabled user ends it at once. Every form carries the session's CSRF token; the
login form (no session yet) a token bound to a short-lived pre-session cookie. The JSON API
authenticates with bearer tokens instead of cookies, so it needs no CSRF token.
Failed logins are limited per client address and per user name (a sliding window).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LoginLimiter", "Session", "Sessions", "same_token"]

SESSION_IDLE_S = 8 * 3600.0


def same_token(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


@dataclass(slots=True)
class Session:
    username: str
    csrf: str
    expires: float


class Sessions:
    def __init__(self, idle_s: float = SESSION_IDLE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle_s = idle_s
        self._clock = clock
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, username: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(username, secrets.token_urlsafe(32), self._clock() + self._idle_s)
        with self._lock:
            self._forget_expired()
            self._by_token[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            now = self._clock()
            if session.expires < now:
                del self._by_token[token]
                return None
            session.expires = now + self._idle_s  # idle timeout: activity keeps it alive
            return session

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def drop_user(self, username: str) -> None:
        with self._lock:
            for token in [t for t, s in self._by_token.items() if s.username == username]:
                del self._by_token[token]

    def _forget_expired(self) -> None:
        now = self._clock()
        for token in [t for t, s in self._by_token.items() if s.expires < now]:
            del self._by_token[token]


class LoginLimiter:
    """At most ``per_user`` failed logins per user name and ``per_client`` per address in ``window_s``."""

    def __init__(self, per_user: int = 5, per_client: int = 20, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = {"user": per_user, "client": per_client}
        self._window_s = window_s
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()  # reading never creates an entry: made-up names cost no memory
        cutoff = self._clock() - self._window_s
        while failures and failures[0] < cutoff:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def _wait(self, keys: list[tuple[str, str]]) -> float:
        wait = 0.0
        for key in keys:
            failures = self._recent(key)
            if len(failures) >= self._limits[key[0]]:
                wait = max(wait, failures[0] + self._window_s - self._clock())
        return wait

    def attempt(self, username: str, client: str) -> float:
        """Reserve one attempt, counted as a failure until ``succeeded``: parallel guesses are
        counted before any is checked. Returns 0, or the seconds to wait (nothing reserved)."""
        keys = [("user", username.lower()), ("client", client)]
        with self._lock:
            wait = self._wait(keys)
            if wait > 0:
                return wait
            now = self._clock()
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
            if len(self._failures) > 100_000:  # a flood of made-up names: drop the oldest entries
                for key in list(self._failures)[:50_000]:
                    del self._failures[key]
            return 0.0

    def retry_after(self, username: str, client: str) -> float:
        """Seconds until another attempt is allowed (0: allowed now); reserves nothing."""
        with self._lock:
            return self._wait([("user", username.lower()), ("client", client)])

    def failed(self, username: str, client: str) -> None:
        """A failure outside ``attempt`` (an attempt already counts as one)."""
        with self._lock:
            now = self._clock()
            for key in (("user", username.lower()), ("client", client)):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, username: str, client: str = "") -> None:
        with self._lock:
            self._failures.pop(("user", username.lower()), None)
            failures = self._failures.get(("client", client))
            if failures:
                failures.pop()  # the reserved attempt was not a failure
