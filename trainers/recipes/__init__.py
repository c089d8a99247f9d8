"""Recipes: a YAML recipe (``configs/``) turned into a Hugging Face Trainer run that trains one adapter per language.

``recipe`` (the recipe's fields, loading and overrides), ``base_models`` (the base model, tokenizer and precision),
``datasets`` (train and per-language eval splits, collators), ``bilevel`` (MiLoRA's Θ step), ``checkpoints``
(staged saves), ``cpu_budget`` (whether a run fits a CPU), ``launch`` (re-running under deepspeed / accelerate),
``model_card``. Imports ``data``, ``evaluation`` and ``offline`` below it, never the command lines or the demo.
"""
