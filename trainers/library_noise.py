"""Quiet what the libraries print that a user of flora-train / flora-eval can do nothing about.

Only named, known messages are silenced, each with the reason and when to drop it:

- DeepSpeed, merely imported (transformers and accelerate import it when installed), warns on a machine without
  CUDA that it "set the accelerator to CPU". A run that does not use DeepSpeed gets ``DS_ACCELERATOR=cpu``
  (unless the user set it), which is the choice it would make anyway, made silently.
- PEFT 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates in favour of
  ``is_activation_checkpointing``; drop the filter once PEFT reads the new name.
"""

from __future__ import annotations

import os
import warnings

import torch


def quiet_library_noise(*, uses_deepspeed: bool) -> None:
    if not uses_deepspeed and "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)
