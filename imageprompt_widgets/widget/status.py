"""The status line's sentences: one for any error, and counted nouns."""

from __future__ import annotations


def error_sentence(err: BaseException) -> str:
    """The status line for an error: our own errors are already sentences; others get one."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower():
        return ("Out of memory: try fewer images at once or a smaller size "
                "(images already generated are kept).")
    if isinstance(err, ValueError):
        return text
    return f"Generation failed ({type(err).__name__}: {text}); details below, and the panel is still usable."


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
