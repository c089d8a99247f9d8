"""Evaluators for the paper's accuracy claims: pass@k on MultiPL-E by running code, and WER on Common Voice.

Modules: ``problems`` (MultiPL-E problems and programs), ``generation`` (completions, one adapter per example),
``sandbox`` / ``confinement`` / ``processes`` (running untrusted programs), ``scoring`` (the pass@k estimator and
reports), ``passk`` (all of it in one call), ``languages`` (toolchains per language), ``wer`` (jiwer). This part
imports only flora_hf and libraries, never the recipes or the offline models.

pass@k::

    from trainers.evaluation import run_passk_eval
    report = run_passk_eval(model, "problems/humaneval-pl.jsonl", adapter={"pl": "perl"}, tokenizer=tokenizer,
                            out_json="out/passk-perl.json")          # or model_or_url="http://localhost:8080"
    report["languages"]["pl"]["pass@1"]

or step by step: :func:`load_problems`, :func:`generate_completions` (local model, one adapter per example) or
:func:`generate_completions_via_server` (a running ``flora-serve``), then :func:`evaluate_completions`, which runs
each program with :func:`run_program` in a sandbox and applies the unbiased :func:`pass_at_k`.

WER::

    from trainers.evaluation import run_wer_eval
    result = run_wer_eval(references, hypotheses, language="mr")   # result.wer, result.normalized_wer
"""

from .generation import AdapterChoice, adapter_names_for, generate_completions, generate_completions_via_server
from .languages import LanguageSpec, canonical_language, known_languages, language_spec, register_language
from .passk import run_passk_eval
from .problems import (
    DEFAULT_N_SAMPLES,
    DEFAULT_TEMPERATURE,
    Problem,
    assemble_program,
    load_problems,
    load_problems_from_hub,
    read_problems_jsonl,
    truncate_at_stop_tokens,
)
from .sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    confinement_problem,
    missing_tools,
    require_confinement,
    run_program,
    toolchain_available,
)
from .scoring import evaluate_completions, mean_pass_at_k, pass_at_k, read_completions_jsonl, write_report
from .wer import WERResult, WordCounts, corpus_wer, run_wer_eval, whisper_normalizer, word_counts

__all__ = [
    "DEFAULT_N_SAMPLES",
    "DEFAULT_TEMPERATURE",
    "AdapterChoice",
    "LanguageSpec",
    "Problem",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "confinement_problem",
    "WERResult",
    "WordCounts",
    "adapter_names_for",
    "assemble_program",
    "canonical_language",
    "corpus_wer",
    "evaluate_completions",
    "generate_completions",
    "generate_completions_via_server",
    "known_languages",
    "language_spec",
    "load_problems",
    "load_problems_from_hub",
    "mean_pass_at_k",
    "missing_tools",
    "pass_at_k",
    "read_completions_jsonl",
    "read_problems_jsonl",
    "register_language",
    "run_passk_eval",
    "require_confinement",
    "run_program",
    "run_wer_eval",
    "toolchain_available",
    "truncate_at_stop_tokens",
    "whisper_normalizer",
    "word_counts",
    "write_report",
]
