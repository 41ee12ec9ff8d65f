"""Text from data or models, shown verbatim in the reports' GitHub-flavoured Markdown.

``md_text`` for table cells and running text, ``md_code`` for a code span outside a table (a table splits
its rows at every ``|``, inside code spans too). Neither lets the text inject HTML or break a table.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"[\\`*~\[\]<>|&]|(?<![^\W_])_|_(?![^\W_])")
"""Characters Markdown or HTML would interpret anywhere in a line: emphasis, links, code, tags, entities,
table cells; a backslash before any ASCII punctuation makes it a literal character. An underscore between
two letters or digits (IP_ADDRESS) cannot start or end emphasis and stays as it is."""


def md_text(s) -> str:
    """``s`` as literal Markdown text on one line: special characters backslash-escaped, line breaks as
    ``<br>``, a leading ``#`` escaped (a heading at the start of a line)."""
    s = _SPECIAL.sub(r"\\\g<0>", str(s))
    return re.sub(r"\r\n?|\n", "<br>", re.sub(r"^#", r"\\#", s))


def md_code(s) -> str:
    """``s`` as one code span: a fence of backticks longer than any run inside, line breaks as spaces (a
    code span shows them so; a raw one could start a block)."""
    s = re.sub(r"\r\n?|\n", " ", str(s))
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", s)), default=0))
    if s[:1] in ("`", " ") or s[-1:] in ("`", " "):
        s = f" {s} "  # one space each side is stripped: a backtick at either end cannot join the fence
    return f"{fence}{s}{fence}"
