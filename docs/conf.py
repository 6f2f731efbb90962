"""Sphinx configuration of the API reference: ``python -m sphinx -W --keep-going -b html docs build/docs``.

The docstrings are reStructuredText (``:func:`` roles, ``::`` literal blocks) with Google-style
``Args:`` / ``Raises:`` sections, which Sphinx reads natively (autodoc, and napoleon's Google
parser, both shipped with Sphinx); ``-W`` turns every docstring that does not parse into an error.
"""

from __future__ import annotations

import inspect
import re

from lightning.pytorch import Callback
from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring

import lightning_tricks
from lightning_tricks.callbacks._base import TrickCallback

project = "lightning-tricks"
release = version = lightning_tricks.__version__
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}
# ``Attributes:`` as fields (napoleon_use_ivar): the attributes themselves are documented as members.
NAPOLEON = NapoleonConfig(napoleon_use_rtype=False, napoleon_use_ivar=True)

# The protocol every callback shares (Lightning's hooks, state_dict, the TrickCallback plumbing) is
# not the user's API of any one callback: a callback's page shows its arguments, its own properties
# and methods.
PROTOCOL = {name for base in (Callback, TrickCallback) for name, _ in inspect.getmembers(base)}


def skip_protocol(app, what, name, obj, skip, options):
    """Leave a callback's Lightning hooks and base-class plumbing out of its page."""
    if what == "class" and name in PROTOCOL:
        return True
    return None


# The docstrings write formulas in plain text: |B| for a size, ‖x‖ and |g| for norms, (B, *shape)
# for shapes. In reStructuredText |...| is a substitution and *...* emphasis, so outside code
# (``literal``, `roles`, ``::`` blocks, doctests) a bar, and a star that opens no emphasis, are
# taken literally.
CODE = re.compile(r"(``.+?``|:?[\w:+-]*`[^`]+`_{0,2})", re.S)
EMPHASIS = re.compile(r"(\*\*[^*\s][^*]*?\*\*|(?<![\w*])\*[^*\s][^*]*?\*(?![\w*]))")


def literal_text(text: str) -> str:
    """``text`` (no code in it) with ``|`` and stray ``*`` escaped."""
    parts = EMPHASIS.split(text.replace("|", r"\|"))
    return "".join(part if i % 2 else part.replace("*", r"\*") for i, part in enumerate(parts))


def prose_text(text: str) -> str:
    """``text`` with its prose escaped (:func:`literal_text`) and its code (an inline literal may
    span lines) as written."""
    parts = CODE.split(text)
    return "".join(part if i % 2 else literal_text(part) for i, part in enumerate(parts))


def in_code_blocks(lines: list[str]) -> list[bool]:
    """Per line: inside a literal block (after a paragraph ending in ``::``) or a doctest."""
    flags, block_indent, doctest = [], None, False
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if block_indent is not None and (not stripped or indent > block_indent):
            flags.append(True)
            continue
        block_indent = None
        doctest = stripped.startswith(">>>") or (doctest and bool(stripped))
        flags.append(doctest)
        if not doctest and stripped.endswith("::"):
            block_indent = indent
    return flags


def plain_formulas(app, what, name, obj, options, lines):
    """Escape ``|`` and stray ``*`` in a docstring's prose, in place; code stays as written."""
    flags = in_code_blocks(lines)
    start = 0
    while start < len(lines):
        end = start + 1
        while end < len(lines) and flags[end] == flags[start] and (flags[start] or lines[end].strip()):
            end += 1
        if not flags[start]:  # one paragraph (or blank line) of prose
            lines[start:end] = prose_text("\n".join(lines[start:end])).split("\n")
        start = end


def google_sections(app, what, name, obj, options, lines):
    """``Args:``, ``Returns:``, ``Raises:`` ... sections as Sphinx fields (what napoleon's extension
    does), except in the docstrings of attributes, properties and data: those are prose (the type
    is annotated), where napoleon would take the text before a first colon for the type."""
    if what not in ("attribute", "property", "data"):
        lines[:] = GoogleDocstring(lines, NAPOLEON, app, what, name, obj, options).lines()


def setup(app):
    app.connect("autodoc-skip-member", skip_protocol)
    app.connect("autodoc-process-docstring", plain_formulas, priority=400)
    app.connect("autodoc-process-docstring", google_sections, priority=500)
