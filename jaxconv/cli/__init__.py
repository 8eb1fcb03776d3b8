"""The command line: ``python -m jaxconv train|evaluate|predict|synth|check|verify``."""

from .commands import main, program

__all__ = ["main", "program"]
