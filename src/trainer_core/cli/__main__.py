"""``python -m trainer_core.cli``: the same as the ``trainer`` command."""

from trainer_core.cli import main

main()
