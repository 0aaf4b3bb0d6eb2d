"""When to try a failed insert again: capped exponential back-off, forever while the sink
runs; once it stops, only until a deadline (then the batch is given up, never committed)."""

from __future__ import annotations

import threading
import time

__all__ = ["Retry"]

FIRST_DELAY_S = 0.25


class Retry:
    """Shared by the sink thread (which stops it) and the writer thread (which waits on it)."""

    def __init__(self, max_delay_s: float, first_delay_s: float = FIRST_DELAY_S) -> None:
        self.max_delay_s = max_delay_s
        self.first_delay_s = first_delay_s
        self._stopping = threading.Event()
        self._give_up_at = float("inf")

    def reset(self) -> None:
        self._stopping.clear()
        self._give_up_at = float("inf")

    def stop(self, grace_s: float) -> None:
        """The sink stops: keep retrying for ``grace_s`` more seconds, then give up."""
        self._give_up_at = time.monotonic() + grace_s
        self._stopping.set()

    def abort(self) -> None:
        """Give up at once (the sink failed)."""
        self._give_up_at = 0.0
        self._stopping.set()

    def gave_up(self) -> bool:
        return time.monotonic() >= self._give_up_at

    def delay(self, attempt: int) -> float:
        """Back-off before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        return min(self.max_delay_s, self.first_delay_s * 2**attempt)

    def sleep(self, delay: float) -> bool:
        """Wait ``delay`` s before the next try; False when that would pass the deadline."""
        if self._stopping.is_set():
            if time.monotonic() + delay >= self._give_up_at:
                return False
            time.sleep(delay)
        else:
            self._stopping.wait(delay)  # cut short by a stop, to re-check the deadline
        return True
