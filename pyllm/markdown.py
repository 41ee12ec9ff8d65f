"""Text from data or models, shown verbatim in the reports' GitHub-flavoured Markdown.

``md_text`` for table cells and running text, ``md_code`` for a code span outside a table (a table splits
its rows at every ``|``, inside code spans too). Neither lets the text inject HTML or break a table, and
both cut a text longer than ``MAX_CHARS`` characters.
"""

from __future__ import annotations

import re

MAX_CHARS = 500
"""The most characters of one text (a model's answer, a prompt, an input issue) a report shows: a 200 kB
answer in a table cell makes the page unreadable. The rest is cut, with a mark saying how much."""

_SPECIAL = re.compile(r"[\\`*~\[\]<>|&]|(?<![^\W_])_|_(?![^\W_])")
"""Characters Markdown or HTML would interpret anywhere in a line: emphasis, links, code, tags, entities,
table cells; a backslash before any ASCII punctuation makes it a literal character. An underscore between
two letters or digits (IP_ADDRESS) cannot start or end emphasis and stays as it is."""


def _cut(s) -> tuple[str, str]:
    """``s`` as text cut to ``MAX_CHARS`` characters, and the Markdown mark to show after it ("" when
    nothing was cut); the mark is in italics, which the escaped text cannot be."""
    s = str(s)
    if len(s) <= MAX_CHARS:
        return s, ""
    n = len(s) - MAX_CHARS
    return s[:MAX_CHARS], f" *… ({n:,} more character{'s' if n > 1 else ''})*"


def md_text(s) -> str:
    """``s`` as literal Markdown text on one line: special characters backslash-escaped, line breaks as
    ``<br>``, a leading ``#`` escaped (a heading at the start of a line)."""
    s, cut = _cut(s)
    s = _SPECIAL.sub(r"\\\g<0>", s)
    return re.sub(r"\r\n?|\n", "<br>", re.sub(r"^#", r"\\#", s)) + cut


def md_code(s) -> str:
    """``s`` as one code span: a fence of backticks longer than any run inside, line breaks as spaces (a
    code span shows them so; a raw one could start a block)."""
    s, cut = _cut(s)
    s = re.sub(r"\r\n?|\n", " ", s)
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", s)), default=0))
    if s[:1] in ("`", " ") or s[-1:] in ("`", " "):
        s = f" {s} "  # one space each side is stripped: a backtick at either end cannot join the fence
    return f"{fence}{s}{fence}{cut}"
