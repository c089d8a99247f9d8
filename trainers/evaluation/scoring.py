"""pass@k from run programs: the unbiased estimator of Chen et al. (2021) from n samples per problem of which c pass,
the per-problem and per-language report, and the report files (JSON, with the completions beside it for rescoring).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from tqdm.auto import tqdm

from .problems import Problem, assemble_program, read_problems_jsonl
from .sandbox import (
    DEFAULT_LIMITS,
    STATUSES,
    SandboxLimits,
    SandboxResult,
    missing_tools,
    require_confinement,
    run_program,
)

logger = logging.getLogger(__name__)

JUDGED = ("passed", "failed", "timeout")
"""Statuses that say something about the completion; "unavailable" and "error" say something about this machine."""


# ------------------------------------------------------------------------------------------------- estimator
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k), as the numerically stable product of Chen et al.

    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` never forms the huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> Optional[float]:
    """Mean pass@k over problems given as ``(n, c)``; None when no problem has at least k judged samples."""
    values = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------ evaluation
def _completions_by_problem(
    problems: Sequence[Problem], completions: Union[Sequence[Sequence[str]], Mapping[str, Sequence[str]]]
) -> list[list[str]]:
    if isinstance(completions, Mapping):
        if len({p.name for p in problems}) != len(problems):
            raise ValueError(
                "problem names repeat (several languages?): pass completions as a list aligned with problems"
            )
        absent = [p.name for p in problems if p.name not in completions]
        if absent:
            raise ValueError(f"no completions for problems {absent[:5]}{'...' if len(absent) > 5 else ''}")
        return [list(completions[p.name]) for p in problems]
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    return [list(c) for c in completions]


def _problem_summary(
    problem: Problem, results: list[SandboxResult], ks: Sequence[int], keep_outputs: bool
) -> dict[str, Any]:
    statuses = Counter(r.status for r in results)
    n = sum(statuses[s] for s in JUDGED)
    c = statuses["passed"]
    summary: dict[str, Any] = {
        "name": problem.name,
        "language": problem.language,
        "n": n,
        "c": c,
        "statuses": {s: statuses[s] for s in STATUSES},
    }
    for k in ks:
        summary[f"pass@{k}"] = pass_at_k(n, c, k) if n >= k else None
    if keep_outputs:
        summary["results"] = [r.to_dict() for r in results]
    return summary


def _language_summary(summaries: list[dict[str, Any]], ks: Sequence[int], missing: list[str]) -> dict[str, Any]:
    totals = Counter()
    for s in summaries:
        totals.update(s["statuses"])
    scored = [(s["n"], s["c"]) for s in summaries if s["n"] > 0]
    out: dict[str, Any] = {
        "toolchain": "unavailable" if missing or not scored else "available",
        "detail": f"missing: {', '.join(missing)}" if missing else "",
        "problems": len(summaries),
        "problems_scored": len(scored),
        "samples": sum(totals.values()),
        **{s: totals[s] for s in STATUSES},
    }
    if not missing and not scored and totals["unavailable"]:
        out["detail"] = "every run reported a missing part of the toolchain (e.g. a test library)"
    for k in ks:
        out[f"pass@{k}"] = mean_pass_at_k(scored, k)
    return out


def evaluate_completions(
    problems: Sequence[Problem],
    completions_per_problem: Union[Sequence[Sequence[str]], Mapping[str, Sequence[str]]],
    *,
    ks: Sequence[int] = (1,),
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: Optional[int] = None,
    drop_privileges: Optional[bool] = None,
    keep_outputs: bool = False,
    progress: bool = False,
    unsafe_no_sandbox: bool = False,
) -> dict[str, Any]:
    """Run every completion's program in the sandbox and report pass@k per language and overall.

    ``completions_per_problem`` is a list aligned with ``problems`` or a mapping from problem name, each a list of
    raw completions (cut at stop tokens here). Identical programs run once. Languages whose toolchain is missing are
    reported ``"toolchain": "unavailable"`` with ``pass@k`` None, never as 0%; samples that could not be judged
    (unavailable, sandbox error) are left out of n. ``workers`` defaults to the CPU count. ``keep_outputs`` adds
    every run's (capped) stdout/stderr to the per-problem entries: large for 100 samples x 164 problems.
    Raises :class:`~trainers.evaluation.sandbox.SandboxUnavailable` before running anything when programs cannot
    be confined here, unless ``unsafe_no_sandbox``.
    """
    if not unsafe_no_sandbox:
        require_confinement(drop_privileges=drop_privileges)
    completions = _completions_by_problem(problems, completions_per_problem)
    languages = sorted({p.language for p in problems})
    missing = {lang: missing_tools(lang, drop_privileges=drop_privileges) for lang in languages}

    programs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i, (problem, samples) in enumerate(zip(problems, completions)):
        for j, completion in enumerate(samples):
            key = (problem.language, assemble_program(problem, completion))
            programs.setdefault(key, []).append((i, j))

    results: list[list[Optional[SandboxResult]]] = [[None] * len(samples) for samples in completions]
    to_run = [key for key in programs if not missing[key[0]]]
    for (lang, _), slots in programs.items():
        if missing[lang]:
            skipped = SandboxResult("unavailable", None, "", "", 0.0, detail=f"missing: {', '.join(missing[lang])}")
            for i, j in slots:
                results[i][j] = skipped

    def run(key: tuple[str, str]) -> SandboxResult:
        return run_program(
            key[1], key[0], limits, drop_privileges=drop_privileges, unsafe_no_sandbox=unsafe_no_sandbox
        )

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        outcomes = pool.map(run, to_run)
        if progress:
            outcomes = tqdm(outcomes, total=len(to_run), desc="running programs", unit="program")
        for key, result in zip(to_run, outcomes):
            for i, j in programs[key]:
                results[i][j] = result

    summaries = [_problem_summary(p, list(r), ks, keep_outputs) for p, r in zip(problems, results)]
    errors = sum(s["statuses"]["error"] for s in summaries)
    if errors:
        logger.warning("%d sample(s) could not be run (sandbox error); they are left out of pass@k", errors)
    by_language = {
        lang: _language_summary([s for s in summaries if s["language"] == lang], ks, missing[lang])
        for lang in languages
    }
    scored = [(s["n"], s["c"]) for s in summaries if s["n"] > 0]
    report: dict[str, Any] = {
        "ks": list(ks),
        "problems": len(problems),
        "samples": sum(len(c) for c in completions),
        "programs_run": len(to_run),
        "limits": asdict(limits),
        "sandbox": "none (--unsafe-no-sandbox)" if unsafe_no_sandbox else "namespaces",
        "unavailable_languages": [lang for lang, s in by_language.items() if s["toolchain"] == "unavailable"],
    }
    for k in ks:
        report[f"pass@{k}"] = mean_pass_at_k(scored, k)
    report["languages"] = by_language
    report["per_problem"] = summaries
    return report


def write_report(
    report: Mapping[str, Any],
    out_json: Union[str, Path],
    problems: Optional[Sequence[Problem]] = None,
    completions: Optional[Sequence[Sequence[str]]] = None,
) -> Path:
    """Write ``report`` as JSON, and the completions (if given) to ``<out_json>.completions.jsonl``."""
    path = Path(out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    if problems is not None and completions is not None:
        with open(path.with_name(path.name + ".completions.jsonl"), "w", encoding="utf-8") as f:
            for problem, samples in zip(problems, completions):
                f.write(json.dumps({**problem.to_dict(), "completions": list(samples)}) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    return repr(value)


def read_completions_jsonl(path: Union[str, Path]) -> tuple[list[Problem], list[list[str]]]:
    """Problems and completions written by :func:`write_report`, to rescore without generating again."""
    problems = read_problems_jsonl(path)
    completions = [list(p.extra.get("completions", [])) for p in problems]
    stripped = [Problem(p.name, p.language, p.prompt, p.tests, p.stop_tokens, {}) for p in problems]
    return stripped, completions
