"""CSV text of result tables that is safe to open in a spreadsheet.

Excel, LibreOffice and Google Sheets read a cell starting with ``=``, ``+``, ``-`` or ``@`` (or a tab or
carriage return before one) as a formula, so a class folder named ``=HYPERLINK(...)`` would run when a
reader opens ``per_class.csv``. Text cells starting that way get a leading apostrophe, the spreadsheet
convention for "this is text" (OWASP, CSV injection); numbers are written as numbers.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Sequence

#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value``, with an apostrophe before text a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _breaks_line(row: Sequence[Any]) -> bool:
    return any(isinstance(v, str) and ("\r" in v or "\n" in v) for v in row)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The CSV (``\\n`` line ends) of ``header`` and ``rows``, every text cell passed through ``safe_cell``.

    A row with a line break inside a text cell is written with its text quoted: Python < 3.12 does not
    quote a carriage return when the line end is ``\\n``, which would split the row in two.
    """
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    for row in [list(header), *rows]:
        row = [safe_cell(v) for v in row]
        (quoted if _breaks_line(row) else plain).writerow(row)
    return buf.getvalue()
