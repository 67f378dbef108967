"""Public building blocks for generation (for plugin authors and services).

Answer formats: ``AnswerFormat`` (also importable from ``trainer_core`` without torch),
``check_answer``, and ``FormatConstraint``, the logits processor that holds rows to their
formats (``generate(..., formats=...)`` adds it). Soft processors: triggers, penalties and
``ForceEndAfterTrigger``. The implementations live in ``trainer_core.generate``; this module is
the stable import path: ``from trainer_core.generation import AnswerFormat, generate``.
Importing it imports torch and transformers.
"""

from trainer_core.generate.formats import AnswerFormat, FormatConstraint, check_answer
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
    "AnswerFormat", "FormatConstraint", "ForceEndAfterTrigger", "LiteralTrigger",
    "RepeatTrigger", "RowTracker", "TokenBytes", "TokenPenalty", "TriggerSpec", "check_answer",
    "end_of_turn_ids", "generate", "trailing_run",
]
