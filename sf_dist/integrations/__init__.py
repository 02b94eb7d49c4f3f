"""Callbacks for frameworks that own the training loop: ``transformers`` (HF Trainer) and ``lightning``.

Each is imported on use (``sf_dist.integrations.transformers``), so neither framework is needed otherwise.
"""
