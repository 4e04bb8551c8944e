"""The one error class of the library (einops' habit): every bad input raises it, with the fix in the text."""

from __future__ import annotations


class SignalpropError(ValueError):
    """Raised for bad input: the message says what was wrong, what is accepted and what to do.

    A subclass of ``ValueError``, so code that already catches ``ValueError`` catches it too.

    Examples:
        >>> import signalprop as sp
        >>> try:
        ...     sp.theory.gain("tanh(2)")
        ... except sp.SignalpropError as err:
        ...     print(str(err).split(";")[0])
        activation 'tanh' takes no parameters, got 'tanh(2)'
        >>> issubclass(sp.SignalpropError, ValueError)
        True
    """
