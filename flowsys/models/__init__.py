"""Reference models written against the public API."""

from flowsys.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
