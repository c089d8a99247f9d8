"""The unbiased pass@k estimator, MultiPL-E problem handling, and an end-to-end scoring run in Python and Perl."""

from __future__ import annotations

import json
import math
import sys

import pytest

from trainers.evaluation import (
    LanguageSpec,
    Problem,
    SandboxLimits,
    assemble_program,
    evaluate_completions,
    load_problems,
    mean_pass_at_k,
    pass_at_k,
    read_completions_jsonl,
    register_language,
    truncate_at_stop_tokens,
    write_report,
)

from .helpers import PL_PROBLEM, PL_RIGHT, PL_WRONG, PY_PROBLEM, PY_RIGHT, PY_WRONG


def naive_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ------------------------------------------------------------------------------------------------- estimator
def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(100, 37, 1) == pytest.approx(0.37)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0  # nothing correct
    assert pass_at_k(5, 1, 5) == 1.0  # k = n: one correct sample is always drawn
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of k contains a correct one
    assert pass_at_k(5, 2, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)  # k > n


@pytest.mark.parametrize("n", [1, 5, 10, 100])
def test_matches_the_combinatorial_formula(n):
    for c in range(n + 1):
        for k in {1, 2, 5, 10, n} & set(range(1, n + 1)):
            assert pass_at_k(n, c, k) == pytest.approx(naive_pass_at_k(n, c, k), abs=1e-12)


def test_stable_for_large_n():
    # C(2000, 1000) overflows a float; the product form does not need it
    assert pass_at_k(2000, 10, 1000) == pytest.approx(1 - math.prod(1 - 1000 / i for i in range(1991, 2001)))
    assert 0.0 < pass_at_k(2000, 1, 100) < 1.0


def test_mean_over_problems():
    assert mean_pass_at_k([(5, 2), (5, 0), (10, 10)], 1) == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    assert mean_pass_at_k([(5, 2), (3, 1)], 4) == pytest.approx(pass_at_k(5, 2, 4))  # n < k: left out
    assert mean_pass_at_k([], 1) is None


# -------------------------------------------------------------------------------------------------- programs
def test_truncate_at_the_earliest_stop_token():
    assert truncate_at_stop_tokens("    return 1\n\ndef g():\n#x", ["\n#", "\ndef"]) == "    return 1\n"
    assert truncate_at_stop_tokens("no stop here", ["\ndef"]) == "no stop here"
    assert truncate_at_stop_tokens("abc", []) == "abc"
    assert truncate_at_stop_tokens("abc", [""]) == "abc"


def test_program_is_prompt_completion_newline_tests():
    program = assemble_program(PY_PROBLEM, PY_RIGHT + "\ndef junk(:\n")
    assert program == PY_PROBLEM.prompt + PY_RIGHT + "\n" + PY_PROBLEM.tests


def test_load_multipl_e_jsonl(tmp_path):
    rows = [
        {**PY_PROBLEM.to_dict(), "doctests": "keep", "original": "x.py", "prompt_terminology": "reworded"},
        {**PL_PROBLEM.to_dict(), "language": "perl"},
    ]
    path = tmp_path / "humaneval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_problems(path)
    assert [p.language for p in problems] == ["py", "pl"]
    assert problems[0].stop_tokens == PY_PROBLEM.stop_tokens and problems[0].extra["doctests"] == "keep"
    assert load_problems(str(path), limit=1) == problems[:1]
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl")
    path.write_text(json.dumps({"name": "x", "language": "py", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        load_problems(path)


def test_hub_without_datasets_says_how_to_pass_a_local_jsonl(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed / offline
    with pytest.raises(RuntimeError, match="local jsonl"):
        load_problems("perl")


def test_problem_languages_are_canonical():
    assert Problem.from_dict({**PL_PROBLEM.to_dict(), "language": "Perl"}).language == "pl"
    assert Problem.from_dict({**PL_PROBLEM.to_dict(), "language": "humaneval-rkt"}).language == "rkt"
    with pytest.raises(KeyError, match="unknown language"):
        Problem.from_dict({**PL_PROBLEM.to_dict(), "language": "cobol-99"})


# ------------------------------------------------------------------------------------------------ end to end
FAKE = LanguageSpec(name="flora-missing-lang", extension=".fm", commands=(("flora-no-such-compiler", "{file}"),))
register_language(FAKE)


def test_evaluate_completions_end_to_end(tmp_path):
    fake_problem = Problem("HumanEval_0_add", FAKE.name, "prompt", "tests", ("\n",))
    problems = [PY_PROBLEM, PL_PROBLEM, fake_problem]
    completions = [
        [PY_RIGHT, PY_WRONG, PY_RIGHT + "\ndef junk(:\n"],  # the third passes once cut at "\ndef"
        [PL_RIGHT, PL_WRONG, "    while (1) {}\n}\n"],  # right, wrong, loops forever
        ["a", "b", "c"],
    ]
    report = evaluate_completions(
        problems, completions, ks=(1, 2), limits=SandboxLimits(timeout_s=1.5), workers=2, keep_outputs=True
    )
    assert report["programs_run"] == 5  # the two identical Python programs run once
    py, pl, fake = report["per_problem"]
    assert (py["n"], py["c"], py["pass@1"]) == (3, 2, pytest.approx(2 / 3))
    assert py["pass@2"] == pytest.approx(naive_pass_at_k(3, 2, 2))
    assert (pl["n"], pl["c"], pl["pass@1"]) == (3, 1, pytest.approx(1 / 3))
    assert pl["statuses"] == {"passed": 1, "failed": 1, "timeout": 1, "error": 0, "unavailable": 0}
    assert [r["status"] for r in pl["results"]] == ["passed", "failed", "timeout"]

    langs = report["languages"]
    assert langs["py"]["pass@1"] == pytest.approx(2 / 3) and langs["py"]["toolchain"] == "available"
    assert langs["pl"]["passed"] == 1 and langs["pl"]["failed"] == 1 and langs["pl"]["timeout"] == 1
    # a missing toolchain is reported as such, never as 0%
    assert fake["n"] == 0 and fake["pass@1"] is None and fake["statuses"]["unavailable"] == 3
    assert langs[FAKE.name]["toolchain"] == "unavailable" and langs[FAKE.name]["pass@1"] is None
    assert "flora-no-such-compiler" in langs[FAKE.name]["detail"]
    assert report["unavailable_languages"] == [FAKE.name]
    assert report["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)

    out = write_report(report, tmp_path / "report.json", problems, completions)
    assert json.loads(out.read_text())["languages"]["pl"]["passed"] == 1
    again_problems, again_completions = read_completions_jsonl(tmp_path / "report.json.completions.jsonl")
    assert again_problems == problems and again_completions == completions


def test_completions_by_problem_name():
    report = evaluate_completions([PY_PROBLEM], {PY_PROBLEM.name: [PY_RIGHT, PY_WRONG]}, workers=1)
    assert report["languages"]["py"]["pass@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no completions"):
        evaluate_completions([PY_PROBLEM], {"other": []})
