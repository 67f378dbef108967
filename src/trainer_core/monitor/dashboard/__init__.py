"""``trainer dashboard``: a local web dashboard of runs, or of a daemon home.

:func:`~trainer_core.monitor.dashboard.server.make_server` builds the server with the run views
(:class:`~trainer_core.monitor.dashboard.views.RunsView`). Another view is one more entry in its
``views`` mapping: an object with ``get``, ``events``, ``action`` and ``script`` (its
JavaScript), composed by the command that starts the server; the page shows one tab per view.
A daemon home's view (queue, history, pause/resume/skip) is
``trainer_core.daemon.dashboard.DaemonView``: it lives in the daemon package, above this one.
Views raise :class:`~trainer_core.monitor.dashboard.base.HTTPError` and resolve paths with
``base.safe_path``, so no view imports the server.
"""
