"""MultiPL-E problems: reading them (jsonl or the hub), cutting a completion at its stop tokens, and assembling the
program that is run: ``prompt + completion + "\\n" + tests``, as in MultiPL-E's harness.

A problem is a JSON object with ``name``, ``language``, ``prompt`` (a function signature and docstring), ``tests``
(code that calls the function and exits non-zero on a wrong answer) and ``stop_tokens``. The FLoRA paper draws
n = 100 samples at temperature 0.1 and reports pass@1: the defaults here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .languages import canonical_language

DEFAULT_N_SAMPLES = 100
DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.95  # MultiPL-E's and the bigcode harness's default; the FLoRA paper gives only the temperature


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
