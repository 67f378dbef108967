"""Settings the embedded demo uses unless the user gives their own.

Applied only when no model is given (the tiny model), below the JSON file and the CLI in
precedence. Kept apart from ``demo.py`` so resolving a config never imports torch.
Values chosen by measurement on a 2-core CPU (see bench/demo_model.py and the README).
"""

from __future__ import annotations

DEMO_PRESET: dict[str, object] = {
    "hyperparams.learning_rate": 3e-3,
    "hyperparams.num_epochs": 3.0,
    "hyperparams.batch_size": 16,
    "hyperparams.max_length": 256,
    "hyperparams.warmup_steps": 5,
    "hyperparams.save_steps": 0,
    "hyperparams.eval_steps": 25,
    "monitoring.preview_steps": 50,
    "monitoring.num_preview_samples": 4,
    "monitoring.max_new_tokens": 48,
    "environment.logging_steps": 5,
}
