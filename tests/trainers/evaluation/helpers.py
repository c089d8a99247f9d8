"""Tiny MultiPL-E-style problems (same fields and program layout as nuprl/MultiPL-E) for the evaluator tests."""

from __future__ import annotations

from trainers.evaluation import Problem

PY_PROBLEM = Problem(
    name="HumanEval_0_add",
    language="py",
    prompt='def add(x: int, y: int) -> int:\n    """Add two numbers.\n    >>> add(2, 3)\n    5\n    """\n',
    tests=(
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n"
        "def test_check():\n    check(add)\n\ntest_check()\n"
    ),
    stop_tokens=("\ndef", "\n#", "\nif", "\nclass"),
)
PY_RIGHT = "    return x + y\n"
PY_WRONG = "    return x - y\n"

PL_PROBLEM = Problem(
    name="HumanEval_0_add",
    language="pl",
    prompt="# Add two numbers x and y\n# >>> add(2, 3)\n# 5\nsub add {\n    my($x, $y) = @_;\n",
    tests=(
        "sub testhumaneval {\n    my $candidate = \\&add;\n"
        "        if($candidate->(2, 3) == 5 && $candidate->(-1, 1) == 0) {\n"
        '        print "ok!" }else{\n        exit 1;\n        }\n}\n\ntesthumaneval();\n'
    ),
    stop_tokens=("\nsub", "\n#", "\n\n\n"),
)
PL_RIGHT = "    return $x + $y;\n}\n"
PL_WRONG = "    return $x * $y;\n}\n"
