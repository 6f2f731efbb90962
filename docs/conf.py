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
CODE = re.compile(r"(``.+?``|:?[\w:+-]*`[^`]+`_{0,2})")
EMPHASIS = re.compile(r"(\*\*[^*\s][^*]*?\*\*|(?<![\w*])\*[^*\s][^*]*?\*(?![\w*]))")


def literal_text(text: str) -> str:
    """``text`` (no code in it) with ``|`` and stray ``*`` escaped."""
    parts = EMPHASIS.split(text.replace("|", r"\|"))
    return "".join(part if i % 2 else part.replace("*", r"\*") for i, part in enumerate(parts))


def plain_formulas(app, what, name, obj, options, lines):
    """Escape ``|`` and stray ``*`` in a docstring's prose, in place; code stays as written."""
    block_indent = None  # indentation of the paragraph that opened a literal block
    doctest = False
    for i, line in enumerate(lines):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if block_indent is not None and (not stripped or indent > block_indent):
            continue
        block_indent = None
        doctest = stripped.startswith(">>>") or (doctest and bool(stripped))
        if doctest:
            continue
        if stripped.endswith("::"):
            block_indent = indent
        parts = CODE.split(line)
        lines[i] = "".join(part if j % 2 else literal_text(part) for j, part in enumerate(parts))


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
