"""Layer 8, training: the recipe (``recipe.run_training`` and its loop), one optimizer step
(``step``: ``prepare_training``, ``train_step``) through the step engine chosen once per run
(``engine``; ``update`` and ``graph_update`` are the CUDA engine's update on the device and
whole-step graphs, ``adamw`` its one-kernel AdamW, ``distributed`` several processes), inputs,
evaluation, checkpoints, signals, the run directory (``rundir``: where a run writes, its lock
and outcome) and what a run records about itself (``manifest``: the plan, run.json, resume
facts).

May import every lower layer (config, plugins, data, demo, model, generate, monitor).
"""
