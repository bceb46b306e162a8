"""pleaco: an easy container platform."""

__version__ = "0.1.0"
