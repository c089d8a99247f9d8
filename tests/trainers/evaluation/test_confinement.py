"""Hostile generated programs, as they ran through ``make eval-starcoder``: each attack fails, counts as a failure,
and leaves nothing behind. Without namespaces the evaluator refuses to run unless told ``--unsafe-no-sandbox``."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from trainers.evaluation import LanguageSpec, SandboxLimits, evaluate_completions, run_passk_eval, run_program
from trainers.evaluation import sandbox as sandbox_module
from trainers.evaluation.confinement import SandboxUnavailable, driver_script
from trainers.evaluation.sandbox import confinement_problem, live_processes

from .helpers import PL_PROBLEM

NO_NAMESPACES = confinement_problem()
confined = pytest.mark.skipif(bool(NO_NAMESPACES), reason=f"no namespaces here: {NO_NAMESPACES}")
AS_ROOT = os.geteuid() == 0
FAST = SandboxLimits(timeout_s=10)


def _marker() -> str:
    return f"flora-attack-{uuid.uuid4().hex}"


def _processes_named(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@confined
@pytest.mark.parametrize("folder", ["/var/tmp", "/dev/shm", "/etc", "/root", os.getcwd()])
def test_writes_outside_the_work_dir_fail_and_leave_nothing(folder):
    name = _marker()
    program = f'open(my $f, ">", "{folder}/{name}") or die "cannot write: $!\\n"; print $f "x"; close $f;\n'
    result = run_program(program, "perl", FAST)
    assert result.status == "failed", result
    assert "cannot write" in result.stderr
    assert not os.path.exists(f"{folder}/{name}")


@confined
def test_the_private_tmp_is_writable_but_is_not_the_machines_and_does_not_outlive_the_run():
    name = _marker()
    write = f'open(my $f, ">", "/tmp/{name}") or die "cannot write: $!\\n"; print $f "first run"; close $f;\n'
    assert run_program(write, "perl", FAST).status == "passed"
    assert not os.path.exists(f"/tmp/{name}")
    # a later run (another uid, or the same one) finds nothing of it: nothing to append to
    read = f'exit(-e "/tmp/{name}" ? 0 : 1);\n'
    later = run_program(read, "perl", FAST)
    assert later.status == "failed", later


@confined
def test_the_total_written_is_bounded_not_only_each_file():
    # 1 MiB files, each under the per-file limit, until the disk is full: the sum stops at disk_bytes
    program = (
        "import sys\nn = 0\ntry:\n    while True:\n"
        "        with open(f'f{n}', 'wb') as f:\n            f.write(b'x' * (1 << 20))\n        n += 1\n"
        "except OSError as err:\n    print(n)\n    sys.exit(f'stopped: {err}')\n"
    )
    limits = SandboxLimits(timeout_s=10, file_size_bytes=2 << 20, disk_bytes=8 << 20)
    result = run_program(program, "python", limits)
    assert result.status == "failed", result
    assert "No space left on device" in result.stderr
    assert int(result.stdout) < 8


@confined
def test_no_connection_to_a_service_on_the_machines_loopback():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    program = (
        "use IO::Socket::INET;\n"
        f'IO::Socket::INET->new(PeerAddr => "127.0.0.1:{port}", Timeout => 3) or die "no connection: $!\\n";\n'
    )
    try:
        result = run_program(program, "perl", FAST)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert result.status == "failed", result
    assert "no connection" in result.stderr
    assert accepted == []


@confined
def test_no_route_out():
    program = (
        "import socket\ns = socket.socket()\ns.settimeout(3)\n"
        "s.connect(('192.0.2.1', 80))\n"  # TEST-NET-1: where a network exists, this would try to leave the machine
    )
    result = run_program(program, "python", FAST)
    assert result.status == "failed", result
    assert "Network is unreachable" in result.stderr
    assert result.duration_s < 3


@confined
@pytest.mark.parametrize("drop_privileges", [None, False], ids=["default", "same-uid"])
def test_a_detached_daemon_does_not_outlive_the_run(drop_privileges):
    # double fork + setsid: the classic daemon, which a process group (and, same uid, a uid sweep) cannot reach
    name = _marker()
    program = (
        "use POSIX qw(setsid);\n"
        "defined(my $pid = fork()) or die;\n"
        "if ($pid == 0) {\n"
        "    setsid(); defined(my $again = fork()) or die; exit 0 if $again;\n"
        f'    $0 = "{name}";\n'
        "    while (1) { select(undef, undef, undef, 0.05); }\n"
        "}\n"
        'waitpid($pid, 0);\nselect(undef, undef, undef, 0.3);\nprint "parent done\\n";\n'
    )
    result = run_program(program, "perl", FAST, drop_privileges=drop_privileges)
    assert result.status == "passed" and "parent done" in result.stdout, result
    assert _processes_named(name) == []
    time.sleep(0.5)
    assert _processes_named(name) == []
    assert live_processes(pgid=result.pid) == []


@confined
def test_an_attack_counts_as_a_failure_in_pass_at_k():
    name = _marker()
    hostile = f'    open(my $f, ">", "/dev/shm/{name}") or die "cannot write: $!\\n"; return $x + $y;\n}}\n'
    report = evaluate_completions([PL_PROBLEM], [[hostile, "    return $x + $y;\n}\n"]], ks=(1,), workers=1)
    entry = report["per_problem"][0] if "per_problem" in report else None
    assert report["languages"]["pl"]["pass@1"] == pytest.approx(0.5), (report, entry)
    assert report["sandbox"] == "namespaces"
    assert not os.path.exists(f"/dev/shm/{name}")


@confined
def test_steps_share_the_work_dir_but_not_their_output():
    # a two-command language (compile, then run) in one sandbox: what step 1 writes, step 2 runs
    spec = LanguageSpec(
        name="flora-two-step",
        extension=".sh",
        commands=(("sh", "{file}"), ("sh", "{stem}.out")),
    )
    program = "echo 'compiler says hi'\nprintf 'echo program says hi\\nexit 3\\n' > program.out\n"
    result = run_program(program, spec, FAST)
    assert result.status == "failed" and result.exit_code == 3, result
    assert result.stdout == "program says hi\n"  # the run step's output only
    assert "program exited with 3" in result.detail


def test_the_driver_keeps_each_steps_pipes_to_itself():
    script = driver_script([["/bin/true"], ["./a b"]], [(5, 6), (7, 8)], 4)
    first, _, second, _ = script.splitlines()
    assert first.startswith("/bin/true </dev/null >&5 2>&6 ") and "4>&-" in first and "7>&-" in first
    assert second.startswith("'./a b' </dev/null >&7 2>&8 ")


def test_without_namespaces_programs_are_refused_unless_unsafe(monkeypatch, tmp_path):
    # a machine without bubblewrap: only perl on the sandbox's PATH
    (tmp_path / "perl").symlink_to(os.path.realpath("/usr/bin/perl"))
    monkeypatch.setattr(sandbox_module, "SANDBOX_PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap.*--unsafe-no-sandbox"):
        run_program('print "hi";\n', "perl", FAST)
    with pytest.raises(SandboxUnavailable):  # before any generation: the server URL is never contacted
        run_passk_eval("http://127.0.0.1:9", [PL_PROBLEM])
    result = run_program('print "hi";\n', "perl", FAST, drop_privileges=False, unsafe_no_sandbox=True)
    assert result.status == "passed" and result.confinement == "none"


def test_flora_eval_refuses_at_once_and_says_how_to_proceed(monkeypatch, tmp_path, capsys):
    from trainers import eval_cli

    monkeypatch.setattr(sandbox_module, "SANDBOX_PATH", str(tmp_path))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("")
    code = eval_cli.main(
        ["--task", "code", "--lang", "perl", "--server", "http://127.0.0.1:9", "--problems", str(problems)]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert (
        "cannot be sandboxed here" in error
        and "--unsafe-no-sandbox" in error
        and "apt-get install bubblewrap" in error
    )
