"""Text on plots: the one rule for strings that come from data (class, folder, file names).

Matplotlib reads a string with a pair of ``$`` as mathtext, so a class named ``$\\frac{a}$``
would be parsed (and fail) instead of shown. ``plain(text)`` escapes every ``$`` so the string
is shown exactly as written; ``_``, ``^`` and ``\\`` are literal outside mathtext. Every plot
label, tick and title built from a name goes through it.
"""


def plain(text):
    """``text`` as matplotlib shows it literally (never mathtext)."""
    return str(text).replace("$", r"\$")


def plain_all(texts):
    """``plain`` of each string of ``texts``, as a list."""
    return [plain(t) for t in texts]
