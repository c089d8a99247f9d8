"""The processes of sandboxed programs: who they are, how to count them, how to end them all.

When the evaluator runs as root, each program runs as its own unused uid (from a high range no account uses, see
``FLORA_SANDBOX_UID_BASE``): ``RLIMIT_NPROC`` then holds exactly (the kernel counts tasks per real uid and does not
enforce the limit for root), and every process of that uid can be killed at once after the run. The allocator
starts at a random place in the range, so separate evaluator runs do not hand out the same uids in the same order.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import threading
import time
from typing import Iterator, NamedTuple, Optional

UID_BASE = int(os.environ.get("FLORA_SANDBOX_UID_BASE", "1900000000"))
UID_RANGE = 1 << 16


class _Task(NamedTuple):
    pid: int
    uid: int
    state: str
    pgid: int


def _tasks() -> Iterator[_Task]:
    """Every process on the machine (zombies included), read from /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat(follow_symlinks=False).st_uid
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it exited while we looked
        yield _Task(int(entry.name), uid, fields[0].decode(), int(fields[2]))


def count_tasks_of_uid(uid: int) -> int:
    """Threads count against RLIMIT_NPROC too, so count /proc/PID/task entries."""
    total = 0
    for task in _tasks():
        if task.uid == uid:
            try:
                total += len(os.listdir(f"/proc/{task.pid}/task"))
            except OSError:
                continue
    return total


def live_processes(*, uid: Optional[int] = None, pgid: Optional[int] = None) -> list[int]:
    """Pids of live (not zombie) processes owned by ``uid`` or in process group ``pgid``."""
    return [
        t.pid
        for t in _tasks()
        if t.state != "Z" and ((uid is not None and t.uid == uid) or (pgid is not None and t.pgid == pgid))
    ]


def kill_uid(uid: int, kill_path: Optional[str]) -> bool:
    """Kill every process of ``uid``: ``kill -1`` run as that uid reaches them all in one atomic sweep."""
    kill = kill_path and shutil.which("kill", path=kill_path)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = live_processes(uid=uid)
        if not pids:
            return True
        if kill is not None:
            subprocess.run(
                [kill, "-9", "-1"],
                user=uid,
                group=uid,
                extra_groups=[],
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            )
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    return False


def _state(pid: int) -> Optional[str]:
    """The process state letter (R, S, Z, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def end_namespace(init_pid: int, timeout_s: float = 5.0) -> bool:
    """Kill a pid namespace's init (every process of the namespace dies with it) and wait until it has.

    The kernel kills the rest of the namespace before the init becomes a zombie, so a zombie or missing init means
    nothing of the namespace is left running. True when that was seen within ``timeout_s``.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(init_pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _state(init_pid) in (None, "Z", "X"):
            return True
        time.sleep(0.002)
    return False


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class UidAllocator:
    """Hands out uids no account and no process uses, one per concurrent run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = secrets.randbelow(UID_RANGE)
        self._leased: set[int] = set()

    def acquire(self) -> int:
        with self._lock:
            busy = {t.uid for t in _tasks()}  # zombies too: they still count against RLIMIT_NPROC
            for _ in range(UID_RANGE):
                uid = UID_BASE + self._next
                self._next = (self._next + 1) % UID_RANGE
                if uid in self._leased or uid in busy or _is_account(uid):
                    continue
                self._leased.add(uid)
                return uid
        raise RuntimeError(f"no free sandbox uid in [{UID_BASE}, {UID_BASE + UID_RANGE})")

    def release(self, uid: int) -> None:
        with self._lock:
            self._leased.discard(uid)


def _is_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


UIDS = UidAllocator()
"""The process-wide allocator: concurrent runs (the evaluator's worker threads) never share a uid."""
