"""``trainer dashboard``: a local web dashboard of runs (and, later, of a daemon home).

:func:`~trainer_core.monitor.dashboard.server.make_server` builds the server with the run views
(:class:`~trainer_core.monitor.dashboard.views.RunsView`). Another view (a daemon home's queue,
history and controls) is one more entry in its ``views`` mapping: an object with ``get``,
``events``, ``action`` and ``script`` (its JavaScript), composed by the command that starts the
server; the page shows one tab per view.
"""
