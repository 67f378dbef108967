"""trainer-regime3: the ``regime3`` data profile for trainer (symbolic reasoner format)."""

__version__ = "0.1.0"
