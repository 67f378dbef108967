"""Layer 6, generation: logits processors and ``generate()`` (``processors``), previews during
training (``previews``), and ``trainer generate`` (``generate``).

May import: model, demo, data, plugins, config, errors. Plugin authors import the processors
through the public ``trainer_core.generation`` module.
"""
