"""FLoRA adapters in vLLM: a general plugin (entry point ``vllm.general_plugins``: ``flora``) that vLLM loads in
every process.

``vllm serve BASE --enable-lora --lora-modules name=/path/to/flora_adapter`` (or ``LLM(..., enable_lora=True)``
with ``LoRARequest`` s) then serves PEFT FLoRA folders exactly as flora-hf computes them, in the same batches as
vLLM's own LoRA adapters and base rows. Scope: any tensor-parallel size (without ``fully_sharded_loras``), dense
(unquantized) linear layers, eager mode (``--enforce-eager`` on GPU; vLLM's CPU backend is always eager with LoRA):
a compiled model refuses FLoRA adapters with that reason.

- :mod:`.loader` reads and validates a FLoRA folder and maps its modules onto vLLM's packed layers (no vLLM import);
- :mod:`.layers` holds the FLoRA banks in vLLM's LoRA linear layers and computes through :mod:`flora_hf.ops`;
- :mod:`.patches` wraps the vLLM internals that have no public seam (each wrap says why, for which release).

Importing this package does not import vLLM; :func:`register` does.
"""

from __future__ import annotations


def register() -> None:
    """vLLM's plugin entry point: install the FLoRA layers, loader and activation (idempotent, every process)."""
    from .patches import install

    install()


__all__ = ["register"]
