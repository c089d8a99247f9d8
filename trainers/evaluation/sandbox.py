"""Run one untrusted, model-generated program and say whether it passed its tests.

Generated code loops, forks, eats memory, fills disks, opens sockets and leaves daemons behind. Each run gets:

- Linux namespaces (:mod:`.confinement`): a private, size-bounded ``/tmp`` as its work directory and only writable
  path, no network, and a pid namespace that ends with it, so nothing it starts outlives it;
- a scrubbed environment (a fixed ``PATH``; ``HOME`` and ``TMPDIR`` its work directory);
- resource limits set before ``exec``: memory (address space and data), number of processes, file size, CPU time,
  open files, no core dumps; as root, its own unused uid, so the process limit is exact (:mod:`.processes`);
- stdout and stderr read to the end, but only the first ``output_bytes`` of each kept.

Where namespaces cannot be made (no bubblewrap, user namespaces disabled, a container's seccomp profile), programs
are refused (:class:`SandboxUnavailable`) unless the caller passes ``unsafe_no_sandbox=True``
(``flora-eval --unsafe-no-sandbox``): then they run with the limits, uid and a temporary directory only, which
does not stop them writing to world-writable paths, reaching the network, or (as a normal user) leaving a daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, NamedTuple, Optional, Union

from .confinement import (
    INSTALL_HINT,
    WORK_DIR,
    SandboxUnavailable,
    bwrap_argv,
    driver_script,
    find_bwrap,
    namespace_init,
    shell_status,
)
from .languages import COMPILED_BINARY, LanguageSpec, language_spec
from .processes import UIDS, count_tasks_of_uid, end_namespace, kill_group, kill_uid, live_processes

__all__ = [
    "DEFAULT_LIMITS",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "confinement_problem",
    "live_processes",
    "missing_tools",
    "require_confinement",
    "run_program",
    "toolchain_available",
]

SANDBOX_PATH = os.environ.get("FLORA_SANDBOX_PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
"""The only ``PATH`` a sandboxed program sees, and where toolchains are looked up (not the caller's venv);
``FLORA_SANDBOX_PATH`` replaces it, e.g. to add a toolchain installed elsewhere."""

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
    disk_bytes: int = 256 << 20
    """Everything the program writes, all files together (its private tmpfs; Go's build cache lives there too)."""

    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout_s) + 1


DEFAULT_LIMITS = SandboxLimits()

MAX_STEPS = 3
"""Commands per program in one sandbox: the driver is POSIX sh, whose redirections name fds 0-9 only."""


@dataclass
class SandboxResult:
    """The outcome of one run. ``pid`` is the process id (and process group id) of what the evaluator started: the
    sandbox (bubblewrap) or, unconfined, the last command; ``uid`` the unprivileged uid it ran as (None when
    privileges were not dropped); ``confinement`` ``"namespaces"`` or ``"none"`` (``unsafe_no_sandbox``)."""

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
    confinement: str = "namespaces"

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


def _limiter(rlimits: list[tuple[int, tuple[int, int]]], remap: tuple[tuple[int, int], ...] = ()):
    """The code run in the child between fork and exec: setrlimit calls, then ``remap`` (source fd -> target fd)."""

    def apply() -> None:
        for which, value in rlimits:
            resource.setrlimit(which, value)
        # move every source out of the target range first, so no dup2 overwrites a source still to be moved
        high = [fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 64) for source, _ in remap]
        for fd, (_, target) in zip(high, remap):
            os.dup2(fd, target)  # inheritable: survives exec

    return apply


class _Status:
    """The driver's status pipe: one ``"step exit-code"`` line per finished step."""

    def __init__(self) -> None:
        self.pending = b""
        self.codes: list[int] = []

    def add(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        self.codes += [shell_status(int(line.split()[1])) for line in lines if line.strip()]


def _watch(proc: subprocess.Popen, sinks: dict, timeout_s: float, status: Optional[_Status] = None) -> bool:
    """Read every pipe in ``sinks`` (fd or file -> sink) until ``proc`` exits; True when ``timeout_s`` ran out
    first. With ``status``, each finished step restarts the clock: every step gets ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    steps_seen = 0
    with selectors.DefaultSelector() as selector:
        for pipe, sink in sinks.items():
            selector.register(pipe, selectors.EVENT_READ, sink)
        while True:
            if status is not None and len(status.codes) > steps_seen:
                steps_seen = len(status.codes)
                deadline = time.monotonic() + timeout_s
            remaining = deadline - time.monotonic()
            if proc.poll() is not None:
                _drain(selector, max_s=0.2)
                return False
            if remaining <= 0:
                return True
            if not selector.get_map():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=remaining)  # every pipe closed: just wait for the exit
                continue
            for key, _ in selector.select(timeout=min(remaining, 0.1)):
                _read_into(selector, key)


def _spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    rlimits: list,
    uid: Optional[int],
    remap: tuple[tuple[int, int], ...] = (),
    **popen,
) -> subprocess.Popen:
    """Start ``argv`` in a new session with the limits; ``remap`` puts pipes at fixed low fd numbers in the child.

    With ``remap``, Popen's own fd closing is off (it would close the remapped fds, since they are created after
    its list of fds to keep): Python opens every fd non-inheritable (PEP 446), so only the remapped ones and
    stdin/stdout/stderr cross ``exec``.
    """
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_limiter(rlimits, remap),
        close_fds=not remap,
        user=uid,
        group=uid,
        extra_groups=[] if uid is not None else None,
        **popen,
    )


def _run_command(
    argv: list[str], *, cwd: str, env: dict[str, str], limits: SandboxLimits, rlimits: list, uid: Optional[int]
) -> _Raw:
    """One command, unconfined (``unsafe_no_sandbox``): its process group is its kill domain."""
    proc = _spawn(argv, env=env, rlimits=rlimits, uid=uid, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
    timed_out = _watch(proc, {proc.stdout: out, proc.stderr: err}, limits.timeout_s)
    kill_group(proc.pid)  # leftovers (background children) die with the group; on timeout, the program too
    if timed_out:
        proc.kill()  # in case it moved itself to another process group
    returncode = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return _Raw(None if timed_out else returncode, timed_out, out, err, proc.pid)


def _program_file(program: str) -> int:
    """An anonymous in-memory file holding the source, for bubblewrap to copy into the sandbox's tmpfs."""
    fd = os.memfd_create("flora-sandbox-program")
    os.write(fd, program.encode("utf-8"))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_confined(
    bwrap: str,
    spec: LanguageSpec,
    program: str,
    tools: dict[str, str],
    *,
    limits: SandboxLimits,
    rlimits: list,
    uid: Optional[int],
) -> tuple[_Raw, bool]:
    """All of ``spec``'s commands in one sandbox; returns the last step run and whether it was the program's last."""
    file_name = spec.file_name()
    steps = [_argv(command, tools, WORK_DIR, file_name) for command in spec.commands]
    if len(steps) > MAX_STEPS:
        raise ValueError(f"{spec.name}: at most {MAX_STEPS} commands run in one sandbox, not {len(steps)}")
    pipes = [(os.pipe(), os.pipe()) for _ in steps]
    status_read, status_write = os.pipe()
    program_fd = _program_file(program)
    # in the child: the source at fd 3, the status pipe at 4, step i's stdout and stderr at 5 + 2i and 6 + 2i
    outputs = [(5 + 2 * i, 6 + 2 * i) for i in range(len(steps))]
    sources = [program_fd, status_write] + [end[1] for pair in pipes for end in pair]
    info_read, info_write = os.pipe()
    sources.append(info_write)  # not named in the script: any number will do
    remap = tuple(zip(sources, range(3, 3 + len(sources))))
    script = driver_script(steps, outputs, 4)
    argv = bwrap_argv(
        bwrap, disk_bytes=limits.disk_bytes, program_fd=3, info_fd=2 + len(sources), file_name=file_name, script=script
    )
    try:
        proc = _spawn(
            argv,
            env=_environment(spec, WORK_DIR),
            rlimits=rlimits,
            uid=uid,
            remap=remap,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # bubblewrap's own errors
        )
    finally:
        for fd in sources:
            os.close(fd)
    captures = [(_Capture(limits.output_bytes), _Capture(limits.output_bytes)) for _ in steps]
    status, sandbox_errors, info = _Status(), _Capture(4096), _Capture(4096)
    sinks: dict = {status_read: status, proc.stderr: sandbox_errors, info_read: info}
    for ((out_read, _), (err_read, _)), (out, err) in zip(pipes, captures):
        sinks.update({out_read: out, err_read: err})
    try:
        timed_out = _watch(proc, sinks, limits.timeout_s, status)
        kill_group(proc.pid)
        if timed_out:
            proc.kill()  # bubblewrap's init dies with it (--die-with-parent), and every process of the namespace
        returncode = proc.wait()
        init = namespace_init(info.text())
        if init is not None and not end_namespace(init):
            raise RuntimeError(f"the sandbox's processes (namespace init {init}) did not end")
    finally:
        for fd in [status_read, info_read] + [end[0] for pair in pipes for end in pair]:
            os.close(fd)
        proc.stderr.close()
    ran = len(status.codes)
    if not timed_out and ran == 0:
        raise RuntimeError(f"the sandbox did not start (bubblewrap exited {returncode}): {sandbox_errors.text()!r}")
    index = min(ran if timed_out else ran - 1, len(steps) - 1)
    code = None if timed_out else status.codes[-1]
    raw = _Raw(code, timed_out, captures[index][0], captures[index][1], proc.pid)
    return raw, index == len(steps) - 1


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


# ------------------------------------------------------------------------------------------------ confinement
_PROBE = LanguageSpec(name="flora-sandbox-probe", extension=".txt", commands=(("true",),))


@contextlib.contextmanager
def _leased_uid(drop: bool) -> Iterator[Optional[int]]:
    """A fresh unprivileged uid for one run when ``drop`` (else None); every process of it is killed afterwards."""
    uid = UIDS.acquire() if drop else None
    try:
        yield uid
    finally:
        if uid is not None:
            if not kill_uid(uid, SANDBOX_PATH):
                logger.warning("sandbox uid %d still has live processes after cleanup", uid)
            UIDS.release(uid)


@functools.cache
def _probe(drop: bool, bwrap: Optional[str]) -> Optional[str]:
    if bwrap is None:
        return f"bubblewrap (bwrap) is not on {SANDBOX_PATH}"
    tools = {"true": resolve_tool(_PROBE, "true", drop_privileges=drop) or "/bin/true"}
    with _leased_uid(drop) as uid:
        try:
            rlimits = _rlimits(DEFAULT_LIMITS, _PROBE, 64)
            raw, _ = _run_confined(bwrap, _PROBE, "", tools, limits=DEFAULT_LIMITS, rlimits=rlimits, uid=uid)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            return f"bubblewrap cannot create namespaces here: {exc}"
    return None if raw.returncode == 0 else f"a confined test program exited with {raw.returncode}"


def confinement_problem(*, drop_privileges: Optional[bool] = None) -> Optional[str]:
    """None when programs can be confined in namespaces here; else why not (checked once per process)."""
    return _probe(_dropping_privileges(drop_privileges), find_bwrap(SANDBOX_PATH))


def require_confinement(*, drop_privileges: Optional[bool] = None, bwrap: Optional[str] = None) -> None:
    """Raise :class:`SandboxUnavailable`, saying why and what to do, when programs cannot be confined here
    (``bwrap``: the bubblewrap already found on the sandbox PATH, if the caller looked)."""
    problem = _probe(_dropping_privileges(drop_privileges), bwrap or find_bwrap(SANDBOX_PATH))
    if problem is not None:
        raise SandboxUnavailable(f"generated programs cannot be sandboxed here: {problem}. To fix: {INSTALL_HINT}")


def run_program(
    program: str,
    language: Union[str, LanguageSpec],
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    drop_privileges: Optional[bool] = None,
    unsafe_no_sandbox: bool = False,
) -> SandboxResult:
    """Run ``program`` (complete source: prompt, completion and tests) and classify the outcome.

    ``drop_privileges`` (default: when running as root) runs the program as a fresh unprivileged uid; see
    :mod:`.processes`. Raises :class:`SandboxUnavailable` when namespaces cannot be made here, unless
    ``unsafe_no_sandbox`` (then: limits, uid and a temporary directory only; see the module docstring).
    """
    spec = language_spec(language)
    drop = _dropping_privileges(drop_privileges)
    bwrap = None if unsafe_no_sandbox else find_bwrap(SANDBOX_PATH)
    if not unsafe_no_sandbox:
        require_confinement(drop_privileges=drop, bwrap=bwrap)
    tools = {tool: resolve_tool(spec, tool, drop_privileges=drop) for tool in spec.required_tools()}
    absent = [tool for tool, path in tools.items() if path is None]
    if absent:
        detail = f"toolchain missing: {', '.join(absent)} not found on {SANDBOX_PATH}"
        return SandboxResult("unavailable", None, "", "", 0.0, detail=detail)

    start = time.monotonic()
    confinement = "none" if unsafe_no_sandbox else "namespaces"
    with _leased_uid(drop) as uid:
        try:
            own = limits.max_processes if uid is not None else count_tasks_of_uid(os.getuid()) + limits.max_processes
            rlimits = _rlimits(limits, spec, own)
            if unsafe_no_sandbox:
                raw, last_step = _run_unconfined(spec, program, tools, limits=limits, rlimits=rlimits, uid=uid)
            else:
                raw, last_step = _run_confined(bwrap, spec, program, tools, limits=limits, rlimits=rlimits, uid=uid)
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
                confinement=confinement,
            )
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            detail = f"sandbox error: {exc!r}"
            return SandboxResult(
                "error", None, "", "", time.monotonic() - start, detail=detail, confinement=confinement
            )


def _run_unconfined(
    spec: LanguageSpec,
    program: str,
    tools: dict[str, str],
    *,
    limits: SandboxLimits,
    rlimits: list,
    uid: Optional[int],
) -> tuple[_Raw, bool]:
    """Each command in turn in a host temporary directory, removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="flora-sandbox-")
    try:
        file_name = spec.file_name()
        with open(os.path.join(workdir, file_name), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, file_name), uid, uid)
        env = _environment(spec, workdir)
        for step, command in enumerate(spec.commands):
            argv = _argv(command, tools, workdir, file_name)
            raw = _run_command(argv, cwd=workdir, env=env, limits=limits, rlimits=rlimits, uid=uid)
            last_step = step == len(spec.commands) - 1
            if raw.timed_out or raw.returncode != 0:
                break
        return raw, last_step
    finally:
        _remove_tree(workdir)
