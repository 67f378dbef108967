"""``python -m trainer_core``: the same as the ``trainer`` command (and what torchrun runs)."""

from trainer_core.cli import main

main()
