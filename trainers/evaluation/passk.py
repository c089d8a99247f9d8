"""pass@k in one call: problems -> completions (a local model, one adapter per example, or a running server) ->
sandboxed runs -> the unbiased estimator; what ``flora-eval --task code`` runs for a table row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from flora_hf.loading import load_causal_lm, load_named_adapters

from .generation import generate_completions, generate_completions_via_server
from .problems import DEFAULT_N_SAMPLES, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Problem, load_problems
from .sandbox import (
    DEFAULT_LIMITS,
    SandboxLimits,
    require_confinement,
)
from .scoring import evaluate_completions, write_report


# ------------------------------------------------------------------------------------------------- one call
def _load_local_model(model_id: str, adapter_paths: Optional[Mapping[str, str]]) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local folder or hub id, with PEFT adapters loaded by name."""

    model, tokenizer = load_causal_lm(
        model_id, dtype="auto", hint="Without hub access pass a local folder holding the model and its tokenizer "
        "(save_pretrained output)."
    )  # fmt: skip
    if torch.cuda.is_available():
        model = model.to("cuda")
    return load_named_adapters(model, adapter_paths or {}), tokenizer


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
