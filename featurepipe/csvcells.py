"""CSV cells that a spreadsheet never runs: the one rule for every CSV featurepipe writes.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read as a
formula by Excel, LibreOffice and Google Sheets (CSV injection). ``escape`` prefixes such a text
cell with ``'`` (shown as the text itself), and a cell that already starts with ``'`` too, so
``unescape`` gives back exactly what was written. Numbers (``-0.25``) are left as they are.

Every writer (``results.csv``, ``audit/*.csv``, ``predict --csv``) goes through ``writer`` /
``dict_writer``; every reader of those files through ``unescape_row``.
"""

import csv

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def escape(value):
    """The text of a cell as written: ``'`` before a formula trigger (or a leading ``'``)."""
    text = "" if value is None else str(value)
    if not text.startswith(TRIGGERS + ("'",)) or _is_number(text):
        return text
    return "'" + text


def unescape(text):
    """The value ``escape`` was given (text read back from a featurepipe CSV)."""
    return text[1:] if isinstance(text, str) and text.startswith("'") else text


def unescape_row(row):
    """A ``csv.DictReader`` row with every cell unescaped."""
    return {k: unescape(v) for k, v in row.items()}


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Writer:
    def __init__(self, inner):
        self._inner = inner

    def writerow(self, row):
        return self._inner.writerow(self._escaped(row))

    def writerows(self, rows):
        for row in rows:
            self.writerow(row)

    def writeheader(self):
        return self._inner.writeheader()

    def _escaped(self, row):
        if isinstance(row, dict):
            return {k: escape(v) for k, v in row.items()}
        return [escape(v) for v in row]


def writer(fh, **kwargs):
    """``csv.writer`` whose cells are escaped."""
    return _Writer(csv.writer(fh, **kwargs))


def dict_writer(fh, fieldnames, **kwargs):
    """``csv.DictWriter`` whose cells are escaped."""
    return _Writer(csv.DictWriter(fh, fieldnames=fieldnames, **kwargs))
