"""One rank's fatal error ends every rank, promptly, with one line each.

Under torchrun a rank that raises exits non-zero, but the others may be blocked in a collective waiting for it
(NCCL can wait until its timeout; with --cuda_graphs the trainer turns NCCL's async error handling off, so for
ever), and a rank that then exits normally can block again in the process group's teardown. So a failing rank
writes its one-line reason into the process group's key-value store (the first one wins), and every rank runs a
daemon thread that polls that key: when another rank has failed it prints one line, runs the trainer's clean-up
(a fresh run folder without a checkpoint is removed) and ends the process with `os._exit`, which no blocked
collective can delay. The failing rank itself leaves by the ordinary error path; if that has not ended the process
within a grace period (a blocked teardown), the same thread ends it.

One process (no process group) has nothing to watch: every function here is then a no-op.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable, Optional

import torch.distributed as dist

KEY = "blip2fast/fatal"
POLL_S = 0.5  # how often each rank looks at the key (one small store request)
GRACE_S = 10.0  # how long a failing rank's own exit may take before the watcher ends it

_watch: Optional["RankFailureWatch"] = None


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no process group, or a torch without it: then only the collectives' own timeouts apply
        return None


class RankFailureWatch:
    def __init__(self, rank: int, store, poll_s: float = POLL_S):
        self.rank, self.store, self.poll_s = rank, store, poll_s
        self.on_exit: Optional[Callable[[], None]] = None  # the trainer's clean-up, run before the process ends
        self.failed_here = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blip2fast-rank-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        waited = 0.0
        while not self._stop.wait(self.poll_s):
            if self.failed_here:  # our own error is on its way out; end it if the exit blocks
                waited += self.poll_s
                if waited >= GRACE_S:
                    sys.stderr.flush()
                    os._exit(1)
                continue
            try:
                if not self.store.check([KEY]):
                    continue
                reason = self.store.get(KEY).decode(errors="replace")
            except Exception:  # the store went away (its host finished or died): nothing more to learn here
                return
            self.end(f"rank {self.rank}: stopping because {reason}")

    def end(self, line: str) -> None:
        """Print `line`, run the clean-up and end this process at once."""
        print(line, file=sys.stderr, flush=True)
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:
                pass
        sys.stdout.flush()
        os._exit(1)

    def announce(self, reason: str) -> bool:
        """Record this rank's failure for the others (False when another rank failed first)."""
        self.failed_here = True
        line = f"rank {self.rank} failed: {reason}"
        try:
            got = self.store.compare_set(KEY, "", line)
        except Exception:
            return False
        return (got.decode(errors="replace") if isinstance(got, bytes) else str(got)) == line

    def other_failure(self) -> Optional[str]:
        """Another rank's recorded failure, if any."""
        try:
            if self.store.check([KEY]):
                reason = self.store.get(KEY).decode(errors="replace")
                if not reason.startswith(f"rank {self.rank} failed"):
                    return reason
        except Exception:
            pass
        return None

    def stop(self) -> None:
        self._stop.set()


def start(rank: int, world_size: int) -> Optional[RankFailureWatch]:
    """Start watching (several ranks with an initialised process group); None otherwise."""
    global _watch
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    if _watch is None:
        store = _store()
        if store is not None:
            _watch = RankFailureWatch(rank, store)
    return _watch


def current() -> Optional[RankFailureWatch]:
    return _watch


def stop() -> None:
    """A normal end: stop watching (a rank that finishes first must not be ended by a later failure elsewhere)."""
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None
