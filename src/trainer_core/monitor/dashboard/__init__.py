"""``trainer dashboard``: a local web dashboard of runs (and, later, of a daemon home).

:func:`~trainer_core.monitor.dashboard.server.make_server` builds the server with the run views
(:class:`~trainer_core.monitor.dashboard.views.RunsView`); another view is one more entry in its
``views`` mapping plus a script of the same name in ``static/``.
"""
