"""Layer 3, data: read and validate JSONL rows, chat templates with per-turn assistant labels,
the tokenizer, cached preprocessing, batching/packing, and the label preview.

May import: ``trainer_core.config``, ``trainer_core.plugins``, ``trainer_core.errors``.
Never imports the model, training or CLI layers.
"""
