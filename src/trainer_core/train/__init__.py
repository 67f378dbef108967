"""Layer 8, training: the recipe (``recipe.run_training``), one optimizer step (``step``), inputs,
evaluation, checkpoints, signals, the run directory (``rundir``: where a run writes, its lock and
outcome) and what a run records about itself (``manifest``: the plan, run.json, resume facts).

May import every lower layer (config, plugins, data, demo, model, generate, monitor).
"""
