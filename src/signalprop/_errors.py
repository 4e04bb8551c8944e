"""The one error class of the library (einops' habit): every bad input raises it, with the fix in the text."""

from __future__ import annotations


class SignalpropError(ValueError):
    """Raised for bad input: the message says what was wrong, what is accepted and what to do."""
