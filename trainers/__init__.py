"""Training recipes, evaluators and the offline stand-ins for the hub, for FLoRA, LoRA, IA3 and MiLoRA adapters.

Parts, and the one direction they import in (a module imports only from its own part or a part below it)::

    train.py, eval_cli.py        the flora-train / flora-eval command lines
    demo/                        make demo and the small-scale reproduction (they drive the parts below)
      -> recipes/                a recipe (configs/*.yaml) turned into a Trainer run: base model, data, adapters
        -> data/, evaluation/, offline/
                                 readers of code and speech; pass@k, WER and generation; tiny models, synthetic
                                 speech and the model cache that stand in for the hub on a machine without it
          -> flora_hf            the PEFT methods and their math core

``offline`` may use ``data`` (the tiny Whisper is pretrained on speech read by ``data.speech``); ``data`` and
``evaluation`` import neither ``offline`` nor each other. tests/test_import_graph.py keeps it so.

flora_hf is imported first: it registers its PEFT methods and quiets a bitsandbytes import-time warning, which must
happen before anything here imports PEFT.
"""

from pathlib import Path

import flora_hf  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout (configs/, .cache/ live here); trainers/ is used from a source tree."""
