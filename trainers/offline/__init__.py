"""What stands in for the Hugging Face hub on a machine without one: the tiny code model and the tiny Whisper
(pretrained here on local files and synthetic speech, cached by ``model_cache``), espeak-ng speech in Common Voice's
layout (``synth_speech``) and the small training loop their pretraining shares (``step_loop``).

Imports ``data`` (the tiny Whisper is pretrained on speech read by ``data.speech``) and libraries, never the recipes.
"""
