"""``make demo`` and ``make reproduce-small``: the whole toolkit end to end on the offline models.

``code_demo`` (``python -m trainers.demo``) trains one FLoRA adapter per programming language in mixed batches and
prints held-out perplexity; ``serve_demo`` serves those adapters with flora-serve; ``reproduce_small`` runs the
paper's method comparison at toy scale through the recipes and the evaluators. Top of the import order: it may use
every other part.
"""
