"""Run one untrusted, model-generated program and say whether it passed its tests.

Generated code loops, forks, eats memory and fills disks. Each run gets:

- a fresh temporary directory as working directory and ``HOME``, and a scrubbed environment (a fixed ``PATH``);
- its own session (process group), killed as a whole when the program exits or its wall-clock time runs out;
- resource limits set in the child before ``exec``: memory (address space and data), number of processes, file
  size, CPU time, open files, no core dumps;
- stdout and stderr read to the end, but only the first ``output_bytes`` of each kept.

``RLIMIT_NPROC`` counts every task of the real uid, and the kernel does not enforce it for root. So when the evaluator
runs as root, each run executes as its own unused uid (from a high range that no account uses, see
``FLORA_SANDBOX_UID_BASE``): the process limit then holds exactly, and after the run every process of that uid is
killed at once, including ones that left the process group with ``setsid``. As a normal user, the limit is the
user's current task count plus the budget, and cleanup is by process group.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, NamedTuple, Optional, Union

from .languages import COMPILED_BINARY, LanguageSpec, language_spec

SANDBOX_PATH = os.environ.get("FLORA_SANDBOX_PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
"""The only ``PATH`` a sandboxed program sees, and where toolchains are looked up (not the caller's venv);
``FLORA_SANDBOX_PATH`` replaces it, e.g. to add a toolchain installed elsewhere."""

UID_BASE = int(os.environ.get("FLORA_SANDBOX_UID_BASE", "1900000000"))
UID_RANGE = 1 << 16

Status = Literal["passed", "failed", "timeout", "error", "unavailable"]
STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "error", "unavailable")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run; the defaults suit MultiPL-E (its harness gives each program 15 s)."""

    timeout_s: float = 15.0
    memory_bytes: int = 2 << 30
    max_processes: int = 256
    file_size_bytes: int = 16 << 20
    open_files: int = 256
    output_bytes: int = 16 << 10
    cpu_seconds: Optional[int] = None
    """Per process; default: the wall-clock timeout rounded up, plus one."""

    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout_s) + 1


DEFAULT_LIMITS = SandboxLimits()


@dataclass
class SandboxResult:
    """The outcome of one run. ``pid`` is the last command's process id, which was also its process group id;
    ``uid`` the unprivileged uid it ran as (None when privileges were not dropped)."""

    status: Status
    exit_code: Optional[int]
    stdout: str
    stderr: str
    duration_s: float
    pid: Optional[int] = None
    uid: Optional[int] = None
    signal: Optional[str] = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- toolchains
def _others_can_execute(path: str) -> bool:
    """True when a process of an unrelated uid can run ``path`` (tools under /root are not visible to it)."""
    for candidate in {path, os.path.realpath(path)}:
        try:
            if not os.stat(candidate).st_mode & stat.S_IXOTH:
                return False
            folder = os.path.dirname(candidate)
            while True:
                if not os.stat(folder).st_mode & stat.S_IXOTH:
                    return False
                if folder == "/":
                    break
                folder = os.path.dirname(folder)
        except OSError:
            return False
    return True


def _dropping_privileges(drop_privileges: Optional[bool]) -> bool:
    return os.geteuid() == 0 if drop_privileges is None else drop_privileges


def resolve_tool(spec: LanguageSpec, tool: str, *, drop_privileges: Optional[bool] = None) -> Optional[str]:
    """Absolute path of ``tool`` (or an alternative name of it) on :data:`SANDBOX_PATH`, or None."""
    drop = _dropping_privileges(drop_privileges)
    for name in spec.candidates(tool):
        found = shutil.which(name, path=SANDBOX_PATH)
        if found and (not drop or _others_can_execute(found)):
            return found
    return None


def missing_tools(language: Union[str, LanguageSpec], *, drop_privileges: Optional[bool] = None) -> list[str]:
    """Tools ``language`` needs that are not installed where the sandbox can run them."""
    spec = language_spec(language)
    return [t for t in spec.required_tools() if resolve_tool(spec, t, drop_privileges=drop_privileges) is None]


def toolchain_available(language: Union[str, LanguageSpec], *, drop_privileges: Optional[bool] = None) -> bool:
    """Whether programs in ``language`` can run here; missing test libraries are detected per run instead."""
    return not missing_tools(language, drop_privileges=drop_privileges)


# ----------------------------------------------------------------------------------------------- /proc helpers
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


def _count_tasks_of_uid(uid: int) -> int:
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


def _kill_uid(uid: int) -> bool:
    """Kill every process of ``uid``: ``kill -1`` run as that uid reaches them all in one atomic sweep."""
    kill = shutil.which("kill", path=SANDBOX_PATH)
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


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _UidAllocator:
    """Hands out uids no account and no process uses, one per concurrent run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
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


_UIDS = _UidAllocator()


# ---------------------------------------------------------------------------------------------------- running
class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - self.kept
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        if chunk:
            self.chunks.append(chunk)
            self.kept += len(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


class _Raw(NamedTuple):
    returncode: Optional[int]
    timed_out: bool
    stdout: _Capture
    stderr: _Capture
    pid: int


def _rlimits(limits: SandboxLimits, spec: LanguageSpec, max_tasks: int) -> list[tuple[int, tuple[int, int]]]:
    """The child's limits, computed in the parent so the code run between fork and exec stays trivial."""
    cpu = limits.cpu_limit()
    wanted = [
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_FSIZE, (limits.file_size_bytes,) * 2),
        (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
        (resource.RLIMIT_NPROC, (max_tasks,) * 2),
        (resource.RLIMIT_DATA, (limits.memory_bytes,) * 2),
    ]
    if spec.limit_address_space:
        wanted.append((resource.RLIMIT_AS, (limits.memory_bytes,) * 2))
    clamped = []
    for which, (soft, hard) in wanted:
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        clamped.append((which, (soft, hard)))
    return clamped


def _limiter(rlimits: list[tuple[int, tuple[int, int]]]):
    def apply() -> None:  # runs in the child between fork and exec
        for which, value in rlimits:
            resource.setrlimit(which, value)

    return apply


def _run_command(
    argv: list[str], *, cwd: str, env: dict[str, str], limits: SandboxLimits, rlimits: list, uid: Optional[int]
) -> _Raw:
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_limiter(rlimits),  # only setrlimit calls between fork and exec
        user=uid,
        group=uid,
        extra_groups=[] if uid is not None else None,
    )
    out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
    deadline = time.monotonic() + limits.timeout_s
    timed_out = False
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while True:
            remaining = deadline - time.monotonic()
            if proc.poll() is not None:
                _drain(selector, max_s=0.2)
                break
            if remaining <= 0:
                timed_out = True
                break
            if not selector.get_map():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=remaining)  # both pipes closed: just wait for the exit
                continue
            for key, _ in selector.select(timeout=min(remaining, 0.1)):
                _read_into(selector, key)
    _kill_group(proc.pid)  # leftovers (background children) die with the group; on timeout, the program too
    if timed_out:
        proc.kill()  # in case it moved itself to another process group
    returncode = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return _Raw(None if timed_out else returncode, timed_out, out, err, proc.pid)


def _read_into(selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
    chunk = os.read(key.fd, 65536)
    if chunk:
        key.data.add(chunk)
    else:
        selector.unregister(key.fileobj)


def _drain(selector: selectors.BaseSelector, max_s: float) -> None:
    """Read what the exited program left in its pipes; bounded, since a grandchild may still be writing."""
    end = time.monotonic() + max_s
    while selector.get_map() and time.monotonic() < end:
        ready = selector.select(timeout=0)
        if not ready:
            return
        for key, _ in ready:
            _read_into(selector, key)


def _signal_name(returncode: Optional[int]) -> Optional[str]:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _classify(spec: LanguageSpec, raw: _Raw, last_step: bool) -> tuple[Status, str]:
    output = raw.stdout.text() + raw.stderr.text()
    for marker in spec.missing_markers:
        if marker in output:
            return "unavailable", f"toolchain incomplete: {marker!r}"
    if raw.timed_out:
        return "timeout", "wall-clock timeout"
    if raw.returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if raw.returncode != 0:
        what = "program" if last_step else "compile step"
        return "failed", f"{what} exited with {_signal_name(raw.returncode) or raw.returncode}"
    for marker in spec.failure_markers:
        if marker in output:
            return "failed", f"output contains {marker!r}"
    if spec.fail_on_stderr and raw.stderr.kept:
        return "failed", "output on stderr"
    return "passed", ""


def _environment(spec: LanguageSpec, workdir: str) -> dict[str, str]:
    env = {"PATH": SANDBOX_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env.update({key: value.format(dir=workdir) for key, value in spec.env.items()})
    return env


def _argv(command: tuple[str, ...], tools: dict[str, str], workdir: str, file_name: str) -> list[str]:
    stem = os.path.splitext(file_name)[0]
    words = [word.format(file=file_name, stem=stem, dir=workdir) for word in command]
    if command[0] == COMPILED_BINARY:
        words[0] = os.path.join(workdir, stem)
    else:
        words[0] = tools[command[0]]
    return words


def _remove_tree(path: str) -> None:
    def make_writable(func, target, _exc_info) -> None:  # the program may have chmod-ed its files
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target):
            os.chmod(target, 0o700)
        func(target)

    try:
        shutil.rmtree(path, onerror=make_writable)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def run_program(
    program: str,
    language: Union[str, LanguageSpec],
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    drop_privileges: Optional[bool] = None,
) -> SandboxResult:
    """Run ``program`` (complete source: prompt, completion and tests) and classify the outcome.

    ``drop_privileges`` (default: when running as root) runs the program as a fresh unprivileged uid; see the
    module docstring for why that is needed to contain fork bombs.
    """
    spec = language_spec(language)
    drop = _dropping_privileges(drop_privileges)
    tools = {tool: resolve_tool(spec, tool, drop_privileges=drop) for tool in spec.required_tools()}
    absent = [tool for tool, path in tools.items() if path is None]
    if absent:
        detail = f"toolchain missing: {', '.join(absent)} not found on {SANDBOX_PATH}"
        return SandboxResult("unavailable", None, "", "", 0.0, detail=detail)

    start = time.monotonic()
    uid = _UIDS.acquire() if drop else None
    workdir = tempfile.mkdtemp(prefix="flora-sandbox-")
    try:
        file_name = spec.file_name()
        with open(os.path.join(workdir, file_name), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, file_name), uid, uid)
            max_tasks = limits.max_processes
        else:
            max_tasks = _count_tasks_of_uid(os.getuid()) + limits.max_processes
        rlimits = _rlimits(limits, spec, max_tasks)
        env = _environment(spec, workdir)
        for step, command in enumerate(spec.commands):
            argv = _argv(command, tools, workdir, file_name)
            raw = _run_command(argv, cwd=workdir, env=env, limits=limits, rlimits=rlimits, uid=uid)
            last_step = step == len(spec.commands) - 1
            if raw.timed_out or raw.returncode != 0:
                break
        status, detail = _classify(spec, raw, last_step)
        return SandboxResult(
            status=status,
            exit_code=raw.returncode,
            stdout=raw.stdout.text(),
            stderr=raw.stderr.text(),
            duration_s=time.monotonic() - start,
            pid=raw.pid,
            uid=uid,
            signal=_signal_name(raw.returncode),
            stdout_truncated=raw.stdout.truncated,
            stderr_truncated=raw.stderr.truncated,
            detail=detail,
        )
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return SandboxResult("error", None, "", "", time.monotonic() - start, detail=f"sandbox error: {exc!r}")
    finally:
        if uid is not None:
            if not _kill_uid(uid):
                logger.warning("sandbox uid %d still has live processes after cleanup", uid)
            _UIDS.release(uid)
        _remove_tree(workdir)
