"""Layer 8, training: the recipe (``recipe.run_training``), one optimizer step (``step``), inputs,
evaluation, checkpoints, signals and the run directory (``rundir``: where a run writes, its
manifest).

May import every lower layer (config, plugins, data, demo, model, generate, monitor).
"""
