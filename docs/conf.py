"""Sphinx configuration of the API reference: ``python -m sphinx -W --keep-going -b html docs build/docs``.

The docstrings are reStructuredText (``:func:`` roles, ``::`` literal blocks) with Google-style
``Args:`` / ``Raises:`` sections, which Sphinx reads natively (autodoc, and napoleon's Google
parser, both shipped with Sphinx); ``-W`` turns every docstring that does not parse into an error.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any

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
# ``-n`` (nitpicky) checks every cross-reference. Types of the standard library and of third-party
# packages have no inventory here (intersphinx would fetch one over the network), so they are left
# unlinked: in signatures under their full names, ``Tensor``/``Module`` where an annotation or an
# inherited torch docstring names them bare. A generic alias (``HistoryRow = tuple[int, ...]``) is
# shown "alias of tuple[int, ...]", which Sphinx splits at its commas into unresolvable pieces.
THIRD_PARTY = r"(collections|contextlib|os|pathlib|argparse|numpy|np|torch|nn|lightning|matplotlib)\..+"
nitpick_ignore_regex = [
    ("py:class", THIRD_PARTY),
    ("py:class", r"Tensor|Module|Triangulation"),
    ("py:class", r"[\w.~]+\[.*"),
]
# ``Attributes:`` as fields (napoleon_use_ivar): the attributes themselves are documented as members.
NAPOLEON = NapoleonConfig(napoleon_use_rtype=False, napoleon_use_ivar=True)

# The protocol every callback shares (Lightning's hooks, state_dict, the TrickCallback plumbing) is
# not the user's API of any one callback: a callback's page shows its arguments, its own properties
# and methods.
CALLBACKS = "lightning_tricks.callbacks"
PROTOCOL = {name for base in (Callback, TrickCallback) for name, _ in inspect.getmembers(base)}


def defining_class(member: Any) -> type | None:
    """The class whose body defines ``member`` (a function, property, static or class method)."""
    function = getattr(member, "fget", member)
    function = getattr(function, "__func__", function)
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    owner = sys.modules.get(module) if isinstance(module, str) else None
    for part in qualname.split(".")[:-1]:
        owner = getattr(owner, part, None)
    return owner if inspect.isclass(owner) else None


def skip_protocol(app, what, name, obj, skip, options):
    """Leave a callback's Lightning hooks and base-class plumbing (also where a callback takes them
    from a helper class of ``lightning_tricks.callbacks``) out of its page; an engine's
    ``state_dict``, ``setup`` ... are its own API and stay."""
    if what == "class" and name in PROTOCOL:
        owner = defining_class(obj)
        if owner is None or issubclass(owner, Callback) or owner.__module__.startswith(CALLBACKS):
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


def python_object(path: str, scope: str | None) -> Any:
    """The object ``path`` names in the module ``scope`` (as the module's own code would see it), or
    in the package (``lightning_tricks.…``, a module imported as needed); None if it names none."""
    if scope is not None:
        parts, obj = path.split("."), importlib.import_module(scope)
    elif path.startswith("lightning_tricks."):
        parts, obj = path.split(".")[1:], importlib.import_module("lightning_tricks")
    else:
        return None
    for part in parts:
        if not hasattr(obj, part) and inspect.ismodule(obj):
            try:
                importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                return None
        obj = inspect.getattr_static(obj, part, None)
        obj = getattr(obj, "__func__", obj)  # a staticmethod or classmethod: its function
        if obj is None:
            return None
    return obj


def documented_name(path: str, scope: str | None) -> str | None:
    """Where the object ``path`` names (in ``scope``) is documented: its defining module and
    qualified name, then the attribute it reaches, if any, that has no name of its own (a property)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        obj = python_object(".".join(parts[:cut]), scope)
        if inspect.ismodule(obj):
            return ".".join([obj.__name__, *parts[cut:]])
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if isinstance(module, str) and isinstance(qualname, str) and module.startswith("lightning_tricks"):
            return ".".join([module, qualname, *parts[cut:]])
    return None


def resolve_imported_names(app, env, node, contnode):
    """Resolve a Python reference the way the docstring's module resolves the name: a name it
    imports (``AlarmRule`` in ``flow_tracking``, from ``gradient_flow``), a relative name
    (``..fallback.graph_factors``) or a package's re-export (``lightning_tricks.gradients.GramCollector``)
    links to where the object is documented."""
    if node.get("refdomain") != "py":
        return None
    target, module, cls = node["reftarget"], node.get("py:module"), node.get("py:class")
    if target.startswith(".") and module is not None:  # `..fallback.f`: Sphinx took one dot
        dots = len(target) - len(target.lstrip("."))
        target, module = target.lstrip("."), module.rsplit(".", dots + 1)[0]
    scopes = [None] if module is None else [module, None]
    paths = [f"{cls}.{target}", target] if cls else [target]
    domain = env.get_domain("py")
    for scope in scopes:
        for path in paths:
            name = documented_name(path, scope)
            if name is not None and name != target:
                found = domain.resolve_xref(
                    env, node["refdoc"], app.builder, node["reftype"], name, node, contnode
                )
                if found is not None:
                    return found
    return None


def setup(app):
    app.connect("missing-reference", resolve_imported_names)
    app.connect("autodoc-skip-member", skip_protocol)
    app.connect("autodoc-process-docstring", plain_formulas, priority=400)
    app.connect("autodoc-process-docstring", google_sections, priority=500)
