"""pass@k on MultiPL-E: problems, program assembly, sandboxed execution, and the unbiased estimator.

A MultiPL-E problem is a JSON object with ``name``, ``language``, ``prompt`` (a function signature and docstring),
``tests`` (code that calls the function and exits non-zero on a wrong answer) and ``stop_tokens``. A completion is
cut at its first stop token, and the program run is ``prompt + completion + "\\n" + tests``, as in MultiPL-E's
harness. pass@k uses the unbiased estimator of Chen et al. (2021) from n samples per problem of which c pass; the
FLoRA paper draws n = 100 samples at temperature 0.1 and reports pass@1.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .languages import canonical_language
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

DEFAULT_N_SAMPLES = 100
DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.95  # MultiPL-E's and the bigcode harness's default; the FLoRA paper gives only the temperature
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


# -------------------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One MultiPL-E problem; ``language`` is MultiPL-E's key (``pl``, ``rkt``, ...)."""

    name: str
    language: str
    prompt: str
    tests: str
    stop_tokens: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], language: Optional[str] = None) -> Problem:
        missing = [key for key in ("prompt", "tests") if key not in row]
        if missing:
            raise ValueError(f"problem {row.get('name', '?')!r} lacks {missing}; MultiPL-E rows have {_FORMAT}")
        lang = row.get("language") or language
        if not lang:
            raise ValueError(f"problem {row.get('name', '?')!r} has no language; pass language=")
        known = {"name", "task_id", "language", "prompt", "tests", "stop_tokens"}
        return cls(
            name=str(row.get("name") or row.get("task_id") or ""),
            language=canonical_language(lang),
            prompt=row["prompt"],
            tests=row["tests"],
            stop_tokens=tuple(row.get("stop_tokens") or ()),
            extra={key: value for key, value in row.items() if key not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["stop_tokens"] = list(self.stop_tokens)
        extra = row.pop("extra")
        return {**extra, **row}


_FORMAT = "name, language, prompt, tests, stop_tokens"


def read_problems_jsonl(path: Union[str, Path], language: Optional[str] = None) -> list[Problem]:
    """Problems from a local file: JSON lines (MultiPL-E's format), or one JSON list."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [Problem.from_dict(row, language) for row in json.loads(text)]
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                problems.append(Problem.from_dict(json.loads(line), language))
            except (json.JSONDecodeError, ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
    return problems


def load_problems_from_hub(
    language: str,
    benchmark: str = "humaneval",
    split: str = "test",
    dataset: str = "nuprl/MultiPL-E",
    revision: Optional[str] = None,
) -> list[Problem]:
    """``datasets.load_dataset("nuprl/MultiPL-E", f"{benchmark}-{language}")``, with a clear error offline."""
    key = canonical_language(language)
    config = f"{benchmark}-{key}"
    how = (
        f"pass a local jsonl instead (one JSON object per line with {_FORMAT}); on a machine with network, "
        f"export it with: datasets.load_dataset({dataset!r}, {config!r}, split={split!r}).to_json('{config}.jsonl')"
    )
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"loading {dataset} from the hub needs `pip install datasets`; or {how}") from exc
    try:
        rows = datasets.load_dataset(dataset, config, split=split, revision=revision)
    except Exception as exc:  # offline, hub errors and missing configs all surface as different types
        raise RuntimeError(f"could not load {dataset} config {config!r} from the hub ({exc}); {how}") from exc
    return [Problem.from_dict(row, key) for row in rows]


def load_problems(
    source: Union[str, Path, Sequence[Union[Problem, Mapping[str, Any]]]],
    *,
    limit: Optional[int] = None,
    benchmark: str = "humaneval",
    split: str = "test",
) -> list[Problem]:
    """Problems from a local jsonl/json path, a language name (hub: ``nuprl/MultiPL-E``), or a list of rows."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.exists():
            problems = read_problems_jsonl(path)
        elif path.suffix in {".jsonl", ".json"} or os.sep in str(source):
            raise FileNotFoundError(f"no problem file at {path}")
        else:
            problems = load_problems_from_hub(str(source), benchmark=benchmark, split=split)
    else:
        problems = [p if isinstance(p, Problem) else Problem.from_dict(p) for p in source]
    return problems[:limit] if limit is not None else problems


# -------------------------------------------------------------------------------------------------- programs
def truncate_at_stop_tokens(completion: str, stop_tokens: Sequence[str]) -> str:
    """The completion up to (not including) the earliest occurrence of any stop token."""
    cut = len(completion)
    for stop in stop_tokens:
        if stop:
            at = completion.find(stop)
            if at != -1:
                cut = min(cut, at)
    return completion[:cut]


def assemble_program(problem: Problem, completion: str) -> str:
    """The program MultiPL-E runs: prompt, the completion cut at its stop tokens, a newline, the tests."""
    return problem.prompt + truncate_at_stop_tokens(completion, problem.stop_tokens) + "\n" + problem.tests


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
            from tqdm.auto import tqdm

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


# ------------------------------------------------------------------------------------------------- one call
def _load_local_model(model_id: str, adapter_paths: Optional[Mapping[str, str]]) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local folder or hub id, with PEFT adapters loaded by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
    except OSError as exc:
        raise RuntimeError(
            f"could not load model {model_id!r} ({exc}); without hub access pass a local folder holding the model "
            "and its tokenizer (save_pretrained output)"
        ) from exc
    if torch.cuda.is_available():
        model = model.to("cuda")
    if adapter_paths:
        from peft import PeftModel

        items = list(adapter_paths.items())
        model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name)
    return model, tokenizer


def run_passk_eval(
    model_or_url: Any,
    problems: Union[str, Path, Sequence[Union[Problem, Mapping[str, Any]]]],
    adapter: Any = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    out_json: Union[str, Path, None] = None,
    *,
    tokenizer: Any = None,
    adapter_paths: Optional[Mapping[str, str]] = None,
    ks: Sequence[int] = (1,),
    max_new_tokens: int = 512,
    batch_size: int = 8,
    top_p: float = DEFAULT_TOP_P,
    seed: Optional[int] = None,
    limit: Optional[int] = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: Optional[int] = None,
    mix_adapters: bool = True,
    keep_outputs: bool = False,
    progress: bool = False,
    unsafe_no_sandbox: bool = False,
) -> dict[str, Any]:
    """Generate, run and score in one call: what ``flora-eval`` needs for a pass@k table row.

    - ``model_or_url``: an ``http(s)://`` URL of a running ``flora-serve``/TGI; a loaded model (PeftModel or a
      transformers model with flora-hf adapters) with ``tokenizer``; or a local folder / hub id to load, with
      ``adapter_paths`` (adapter name -> PEFT folder) loaded onto it.
    - ``problems``: a MultiPL-E jsonl path, a language (``"perl"``: ``nuprl/MultiPL-E`` humaneval from the hub), or
      a list of problems; ``limit`` keeps the first ones.
    - ``adapter``: None (base model), an adapter name, a mapping language -> adapter name, or a callable
      problem -> name (see :data:`trainers.evaluation.generation.AdapterChoice`).

    Returns :func:`evaluate_completions`' report plus the generation settings. With ``out_json``, the report is
    written there and the completions beside it (``<out_json>.completions.jsonl``), so scoring can be rerun.
    """
    from .generation import generate_completions, generate_completions_via_server

    if not unsafe_no_sandbox:
        require_confinement()  # before hours of generation, not after
    problem_list = load_problems(problems, limit=limit)
    if isinstance(model_or_url, str) and model_or_url.startswith(("http://", "https://")):
        source = model_or_url
        completions = generate_completions_via_server(
            model_or_url,
            problem_list,
            adapter,
            n_samples,
            temperature,
            max_new_tokens,
            top_p=top_p,
            seed=seed,
            progress=progress,
        )
    else:
        if isinstance(model_or_url, (str, Path)):
            source = str(model_or_url)
            model_or_url, tokenizer = _load_local_model(source, adapter_paths)
        else:
            source = type(model_or_url).__name__
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass tokenizer=")
        completions = generate_completions(
            model_or_url,
            tokenizer,
            problem_list,
            n_samples,
            temperature,
            adapter,
            batch_size,
            max_new_tokens,
            top_p=top_p,
            seed=seed,
            mix_adapters=mix_adapters,
            progress=progress,
        )
    report = evaluate_completions(
        problem_list,
        completions,
        ks=ks,
        limits=limits,
        workers=workers,
        keep_outputs=keep_outputs,
        progress=progress,
        unsafe_no_sandbox=unsafe_no_sandbox,
    )
    report["generation"] = {
        "source": source,
        "adapter": adapter if adapter is None or isinstance(adapter, (str, Mapping)) else repr(adapter),
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    if out_json is not None:
        write_report(report, out_json, problem_list, completions)
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
