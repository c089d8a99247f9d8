"""Training data for the recipes: code per programming language, speech per spoken language, and the hub.

``code`` / ``code_corpus`` (packed code blocks; the built-in corpus of this machine's source files), ``speech`` /
``audio`` (Common Voice layout, log-mel features, decoding and resampling), ``hub`` (whether the hub is off or
reachable, hub datasets with errors a user can act on), ``cached`` (items computed once). Imports only flora_hf and
libraries. The audio libraries are imported inside ``audio``'s readers, so a code run never needs them, and
``datasets`` only when a hub dataset is asked for.
"""
