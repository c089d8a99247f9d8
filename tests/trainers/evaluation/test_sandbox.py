"""The sandbox runs correct programs, fails wrong ones, and contains loops, fork bombs, memory eaters and floods.

The containment tests run both ways: in namespaces (the default) and with ``unsafe_no_sandbox`` (limits only), since
the limits must hold in either. What only namespaces give is tested in ``test_confinement.py``.
"""

from __future__ import annotations

import os
import time

import pytest

from trainers.evaluation import (
    LanguageSpec,
    SandboxLimits,
    assemble_program,
    missing_tools,
    run_program,
    toolchain_available,
)
from trainers.evaluation.sandbox import confinement_problem, live_processes

from .helpers import PL_PROBLEM, PL_RIGHT, PL_WRONG, PY_PROBLEM, PY_RIGHT, PY_WRONG

AS_ROOT = os.geteuid() == 0
FAST = SandboxLimits(timeout_s=10)
NO_NAMESPACES = confinement_problem()
MODES = [
    pytest.param(False, id="namespaces", marks=pytest.mark.skipif(bool(NO_NAMESPACES), reason=str(NO_NAMESPACES))),
    pytest.param(True, id="unconfined"),
]


def _gone(result) -> None:
    """Nothing of the run is left: not in its process group, and (as root) not under its uid."""
    assert result.pid is not None
    assert live_processes(pgid=result.pid) == []
    if result.uid is not None:
        assert live_processes(uid=result.uid) == []


def test_perl_and_python_are_available():
    assert toolchain_available("perl") and toolchain_available("pl")
    assert toolchain_available("python") and toolchain_available("py")


@pytest.mark.parametrize(
    ("problem", "right", "wrong"),
    [(PY_PROBLEM, PY_RIGHT, PY_WRONG), (PL_PROBLEM, PL_RIGHT, PL_WRONG)],
    ids=["py", "pl"],
)
def test_correct_completion_passes_and_wrong_one_fails(problem, right, wrong):
    ok = run_program(assemble_program(problem, right), problem.language, FAST)
    assert ok.status == "passed", ok
    assert ok.exit_code == 0 and ok.duration_s < 5
    bad = run_program(assemble_program(problem, wrong), problem.language, FAST)
    assert bad.status == "failed", bad
    assert bad.exit_code != 0


@pytest.mark.parametrize("unsafe", MODES)
def test_runs_unprivileged_in_a_private_directory_with_a_scrubbed_environment(monkeypatch, unsafe):
    monkeypatch.setenv("FLORA_SECRET_TOKEN", "do-not-leak")
    program = "import os, sys\nprint(os.getcwd()); print(os.environ.get('FLORA_SECRET_TOKEN')); print(os.getuid())\n"
    result = run_program(program, "python", FAST, unsafe_no_sandbox=unsafe)
    assert result.status == "passed", result
    assert result.confinement == ("none" if unsafe else "namespaces")
    cwd, secret, uid = result.stdout.split()
    if unsafe:  # a host temporary directory, removed afterwards
        assert os.path.basename(cwd).startswith("flora-sandbox-") and not os.path.exists(cwd)
    else:  # the sandbox's private tmpfs
        assert cwd == "/tmp"
    assert secret == "None"
    if AS_ROOT:
        assert int(uid) == result.uid and int(uid) != 0


@pytest.mark.parametrize("unsafe", MODES)
def test_infinite_loop_times_out_and_its_whole_process_group_is_killed(unsafe):
    # the Perl program leaves a sleeping child behind in its process group, then spins forever
    program = "my $pid = fork();\nif ($pid == 0) { sleep 1000; exit 0; }\n1 while 1;\n"
    start = time.monotonic()
    result = run_program(program, "perl", SandboxLimits(timeout_s=1), unsafe_no_sandbox=unsafe)
    assert result.status == "timeout", result
    assert time.monotonic() - start < 6
    _gone(result)


@pytest.mark.skipif(
    not AS_ROOT, reason="unconfined, killing by uid needs the root path (processes that left the group)"
)
def test_a_process_that_leaves_the_group_is_still_killed_by_uid_when_unconfined():
    program = "setsid sleep 1000 &\nsleep 0.2\nexit 0\n"
    result = run_program(program, "sh", SandboxLimits(timeout_s=5), unsafe_no_sandbox=True)
    assert result.status == "passed", result
    _gone(result)


@pytest.mark.parametrize("unsafe", MODES)
def test_fork_bomb_is_bounded_by_the_process_limit_and_killed(unsafe):
    # every process keeps forking; each successful fork writes one "+": the count is the number of processes made
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.005)\n"
        "        continue\n"
        "    if pid > 0:\n"
        '        os.write(1, b"+")\n'
    )
    limit = 12
    result = run_program(bomb, "python", SandboxLimits(timeout_s=2, max_processes=limit), unsafe_no_sandbox=unsafe)
    assert result.status == "timeout", result
    forks = result.stdout.count("+")
    assert forks >= 1
    # as root the program's uid is its own: exactly `limit` tasks, the first one included
    assert forks <= (limit - 1 if AS_ROOT else limit + 16)
    _gone(result)


@pytest.mark.parametrize("unsafe", MODES)
def test_memory_eater_fails_at_the_memory_limit(unsafe):
    program = "x = bytearray(1 << 30)\nprint('survived')\n"
    result = run_program(program, "python", SandboxLimits(memory_bytes=256 << 20), unsafe_no_sandbox=unsafe)
    assert result.status == "failed", result
    assert "MemoryError" in result.stderr and "survived" not in result.stdout


@pytest.mark.parametrize("unsafe", MODES)
def test_file_size_limit(unsafe):
    program = "with open('big', 'wb') as f:\n    f.write(b'x' * (4 << 20))\n"
    result = run_program(program, "python", SandboxLimits(file_size_bytes=1 << 20), unsafe_no_sandbox=unsafe)
    assert result.status == "failed", result
    assert "File too large" in result.stderr or result.signal == "SIGXFSZ"


@pytest.mark.parametrize("unsafe", MODES)
def test_output_is_capped_but_the_program_completes(unsafe):
    program = "import sys\nsys.stdout.write('x' * 3_000_000)\nsys.stderr.write('e' * 3_000_000)\n"
    result = run_program(program, "python", SandboxLimits(output_bytes=1000), unsafe_no_sandbox=unsafe)
    assert result.status == "passed", result
    assert len(result.stdout) == 1000 and result.stdout_truncated
    assert len(result.stderr) == 1000 and result.stderr_truncated


def test_missing_toolchain_is_unavailable_not_failed():
    fake = LanguageSpec(name="flora-fake", extension=".fk", commands=(("flora-no-such-interpreter", "{file}"),))
    assert not toolchain_available(fake)
    assert missing_tools(fake) == ["flora-no-such-interpreter"]
    result = run_program("anything", fake)
    assert result.status == "unavailable"
    assert "flora-no-such-interpreter" in result.detail


def test_missing_test_library_is_unavailable_not_failed():
    # a toolchain that runs but lacks its test library (luaunit, Test::Deep, ...) says so on stderr
    spec = LanguageSpec(
        name="pl-without-lib",
        extension=".pl",
        commands=(("perl", "{file}"),),
        missing_markers=("Can't locate Flora/NoSuchTestLib.pm",),
    )
    result = run_program("use Flora::NoSuchTestLib;\n", spec, FAST)
    assert result.status == "unavailable", result


def test_perl_error_marker_fails_as_in_multipl_e():
    result = run_program('print "ERROR: mismatch\\n"; exit 0;\n', "perl", FAST)
    assert result.status == "failed" and "ERROR" in result.detail


def test_multipl_e_perl_with_test_deep():
    if run_program("use Test::Deep;\n", "perl", FAST).status == "unavailable":
        pytest.skip("Test::Deep is not installed (Debian: libtest-deep-perl); MultiPL-E's Perl tests need it")
    tests = (
        "use Test::Deep;\n\nsub testhumaneval {\n    my $candidate = \\&add;\n"
        '        if(eq_deeply($candidate->(2, 3),5)) {\n        print "ok!" }else{\n        exit 1;\n        }\n}\n\n'
        "testhumaneval();\n"
    )
    problem = PL_PROBLEM.__class__(**{**PL_PROBLEM.__dict__, "tests": tests})
    assert run_program(assemble_program(problem, PL_RIGHT), "pl", FAST).status == "passed"
    assert run_program(assemble_program(problem, PL_WRONG), "pl", FAST).status == "failed"


OPTIONAL = {
    "rb": ("def add(x, y)\n  x + y\nend\n", "def add(x, y)\n  x - y\nend\n", "exit(add(2, 3) == 5 ? 0 : 1)\n"),
    "js": ("function add(x, y) { return x + y; }\n", "function add(x, y) { return x - y; }\n", None),
    "lua": ("function add(x, y) return x + y end\n", "function add(x, y) return x - y end\n", None),
    "sh": ("add() { echo $(( $1 + $2 )); }\n", "add() { echo $(( $1 - $2 )); }\n", '[ "$(add 2 3)" = 5 ]\n'),
    "rkt": ("#lang racket\n(define (add x y) (+ x y))\n", "#lang racket\n(define (add x y) (- x y))\n", None),
    "d": (
        "long add(long x, long y) {\n    return x + y;\n}\n",
        "long add(long x, long y) {\n    return x - y;\n}\n",
        None,
    ),
}
TESTS = {
    "js": "const assert = require('node:assert');\nassert.deepEqual(add(2, 3), 5);\n",
    "lua": "assert(add(2, 3) == 5)\n",
    "rkt": "(require rackunit)\n(check-equal? (add 2 3) 5)\n",
    "d": "unittest\n{\n    alias candidate = add;\n    assert(candidate(2L, 3L) == 5L);\n}\nvoid main(){}\n",  # MultiPL-E's shape
}


@pytest.mark.parametrize("language", sorted(OPTIONAL))
def test_other_languages_when_installed(language):
    if not toolchain_available(language):
        pytest.skip(f"no {language} toolchain here: {missing_tools(language)}")
    right, wrong, tests = OPTIONAL[language]
    tests = tests or TESTS[language]
    ok = run_program(right + tests, language, FAST)
    assert ok.status == "passed", ok
    bad = run_program(wrong + tests, language, FAST)
    assert bad.status == "failed", bad
