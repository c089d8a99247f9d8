"""Linux namespaces around each sandboxed program, built with bubblewrap (``bwrap``, Debian package ``bubblewrap``).

Resource limits alone do not confine a program: it can still write to ``/tmp`` or ``/dev/shm``, talk to any
service on the machine, and leave a daemon behind with ``setsid``. So every program runs in its own namespaces:

- **filesystem**: the machine's root read-only; ``/tmp`` a fresh tmpfs of ``disk_bytes`` that is the program's work
  directory, ``HOME`` and ``TMPDIR`` and its only writable path (the size bounds the total it can write, in files
  of any number); ``/var/tmp`` and ``/dev/shm`` empty and read-only; a private ``/dev`` and ``/proc``;
- **network**: a network namespace of its own with only a loopback device: no route out, and nothing listening on
  the machine's 127.0.0.1 is reachable;
- **processes**: a pid namespace whose init is bubblewrap's; when the program's driver exits, or the evaluator
  kills it or dies itself (``--die-with-parent``), the kernel kills every process left in the namespace,
  daemons included. Bubblewrap's outer process may exit a moment before that is done, so the evaluator also
  kills the namespace's init itself and waits for it (:func:`~.processes.end_namespace`);
- **users**: a user namespace (with nested ones disabled, so the program cannot build its own mount table), run
  as an unprivileged uid when the evaluator is root (see :mod:`.processes`).

Bubblewrap does the namespace set-up (mount ordering, recursive read-only binds, uid maps) that is easy to get
subtly wrong by hand; it is what Flatpak runs untrusted applications in. All commands of one program (compile,
then run) execute in one sandbox, driven by a short ``sh`` script, so the compiled binary stays on the private
tmpfs between steps; each step's output goes to its own pipes and its exit status to a status pipe.
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
from typing import Optional, Sequence

WORK_DIR = "/tmp"
"""The program's work directory inside the sandbox (the private tmpfs)."""

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) on a kernel that allows user namespaces, or, "
    "inside a container that is itself the sandbox (as MultiPL-E runs), pass --unsafe-no-sandbox "
    "(make ... UNSAFE_NO_SANDBOX=1) to run generated programs with resource limits only"
)


class SandboxUnavailable(RuntimeError):
    """Generated programs cannot be confined on this machine, and the caller did not accept running them unconfined."""


def find_bwrap(path: str) -> Optional[str]:
    return shutil.which("bwrap", path=path)


@functools.cache
def _supports(bwrap: str, option: str) -> bool:
    """Whether this bubblewrap knows ``option`` (``--disable-userns`` needs 0.8)."""
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return option in usage.stdout + usage.stderr


def bwrap_argv(
    bwrap: str, *, disk_bytes: int, program_fd: int, info_fd: int, file_name: str, script: str
) -> list[str]:
    """The bubblewrap command that runs ``script`` (sh) with the program's source copied to ``WORK_DIR/file_name``;
    bubblewrap writes ``{"child-pid": N}`` to ``info_fd``, N being the namespace's init as the machine sees it."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--info-fd", str(info_fd)]
    if _supports(bwrap, "--disable-userns"):
        argv.append("--disable-userns")
    argv += [
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into the evaluator's terminal
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(disk_bytes), "--tmpfs", WORK_DIR,
        "--perms", "0555", "--tmpfs", "/var/tmp", "--remount-ro", "/var/tmp",
        "--perms", "0555", "--tmpfs", "/dev/shm", "--remount-ro", "/dev/shm",
        "--perms", "0644", "--file", str(program_fd), f"{WORK_DIR}/{file_name}",
        "--chdir", WORK_DIR,
        "--", "/bin/sh", "-c", script,
    ]  # fmt: skip
    return argv


def driver_script(steps: Sequence[Sequence[str]], outputs: Sequence[tuple[int, int]], status_fd: int) -> str:
    """Run ``steps`` in order, step i writing to the fds ``outputs[i]``; after each, write ``"i status"`` to
    ``status_fd``; stop at the first step that fails. No step inherits the pipes of another, or the status pipe."""
    every_fd = [fd for pair in outputs for fd in pair] + [status_fd]
    lines = []
    for i, (argv, (out_fd, err_fd)) in enumerate(zip(steps, outputs)):
        closes = " ".join(f"{fd}>&-" for fd in every_fd)
        command = " ".join(shlex.quote(word) for word in argv)
        lines.append(f"{command} </dev/null >&{out_fd} 2>&{err_fd} {closes}")
        lines.append(f'rc=$?; echo "{i} $rc" >&{status_fd}; [ "$rc" -eq 0 ] || exit 0')
    return "\n".join(lines) + "\n"


def namespace_init(info: str) -> Optional[int]:
    """The init's pid from bubblewrap's ``--info-fd`` JSON, or None when it wrote none (it did not start)."""
    try:
        return int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def shell_status(code: int) -> int:
    """sh reports a command killed by signal N as 128 + N; return it as subprocess does (-N)."""
    return -(code - 128) if code > 128 else code
