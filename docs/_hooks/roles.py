"""mkdocs hook: drop the Sphinx role prefixes (``:func:``, ``:class:`` ...) of docstrings.

The docstrings cross-reference with Sphinx roles (":func:`dpmjax.sample`"), which
Markdown renders as the role name followed by the code span; the code span alone reads
as intended.
"""

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(?=<code>)")


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)
