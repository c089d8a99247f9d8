"""Training data for the recipes: code per programming language, speech per spoken language.

Modules are imported on demand (``trainers.data.code``, ``trainers.data.speech``...) so that a code run never
needs the audio libraries and neither needs ``datasets`` unless a hub dataset is asked for.
"""
