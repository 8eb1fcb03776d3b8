"""The command line: ``python -m jaxconv train|evaluate|predict|synth|check|verify``."""

from .commands import main

__all__ = ["main"]
