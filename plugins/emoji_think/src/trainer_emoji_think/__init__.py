"""trainer-emoji-think: the ``emoji_think`` data profile for trainer."""

__version__ = "0.1.0"
