"""voiced: a voice-cloning speech daemon."""

__version__ = "0.1.0"
