"""Public building blocks for generation-time logits processors (for plugin authors).

The implementation lives in ``trainer_core.generate.processors``; this module is the stable
import path: ``from trainer_core.generation import ForceEndAfterTrigger, TokenPenalty``.
Importing it imports torch and transformers.
"""

from trainer_core.generate.processors import (
    ForceEndAfterTrigger,
    LiteralTrigger,
    RepeatTrigger,
    RowTracker,
    TokenBytes,
    TokenPenalty,
    TriggerSpec,
    end_of_turn_ids,
    generate,
    trailing_run,
)

__all__ = [
    "ForceEndAfterTrigger", "LiteralTrigger", "RepeatTrigger", "RowTracker", "TokenBytes",
    "TokenPenalty", "TriggerSpec", "end_of_turn_ids", "generate", "trailing_run",
]
