"""``trainer daemon``: one model, fine-tuned continuously on the files that arrive in an inbox.

Layer 9, above ``train``: it may import train, monitor, generate, model, data, config and the
base modules; only ``cli`` imports it. The daemon process itself never imports torch: training
runs in a child process (:mod:`trainer_core.daemon.worker`) so a crash, an OOM or a NaN there
never takes the daemon down.

Modules:

- :mod:`~trainer_core.daemon.home`: the home directory's layout and its one-daemon OS lock;
- :mod:`~trainer_core.daemon.ledger`: the SQLite (WAL) job ledger, the source of truth;
- :mod:`~trainer_core.daemon.intake`: settle detection in the inbox, ``submit``;
- :mod:`~trainer_core.daemon.schedule`: the learning-rate schedule over the daemon's life;
- :mod:`~trainer_core.daemon.storage`: publishing the current model, snapshots, retention,
  the disk gate;
- :mod:`~trainer_core.daemon.service`: the daemon's loop (supervises the worker);
- :mod:`~trainer_core.daemon.worker`: the training child process;
- :mod:`~trainer_core.daemon.control`: what the CLI's control commands call.
- :mod:`~trainer_core.daemon.dashboard`: the home's view in ``trainer dashboard`` (queue,
  history, pause/resume/skip).
"""
