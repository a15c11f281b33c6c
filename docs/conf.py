"""Sphinx configuration: the markdown pages of docs/ (MyST) and an API reference from the docstrings.

Built by ``bash launch/docs.sh`` with warnings as errors. Everything is local: no intersphinx (the
build has no network), the builtin alabaster theme.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, whatever is installed

import gradvac_dist  # noqa: E402

project = "gradvac_dist"
author = "gradvac_dist authors"
copyright = "gradvac_dist authors"
release = version = gradvac_dist.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# The docstrings are Google style (Args/Returns/Raises/Example); NumPy style is not used.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# GitHub-style anchors for the headings, so that links such as usage.md#fsdp2 work on the site too.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"gradvac_dist {release}"


def _constant_docs(app, what, name, obj, options, lines):
    """A public constant (``gradvac_dist.GROUPINGS``) is documented by the ``#:`` comment above its
    assignment in the private module that defines it; autodoc would otherwise show its type's
    docstring (``tuple``'s), since ``gradvac_dist/__init__.py`` only imports it."""
    if what != "data" or not name.startswith("gradvac_dist."):
        return
    from sphinx.pycode import ModuleAnalyzer

    attr = name.rsplit(".", 1)[1]
    for path in sorted((ROOT / "gradvac_dist").glob("_*.py")):
        docs = ModuleAnalyzer.for_module(f"gradvac_dist.{path.stem}").find_attr_docs()
        if ("", attr) in docs:
            lines[:] = list(docs[("", attr)])
            return
    raise ValueError(f"{name}: no #: comment documents it in gradvac_dist/_*.py")


#: A URL ending in an underscore, as the paper's OpenReview address (...forum?id=F1vEjWK-lH_):
#: reStructuredText would read ``lH_`` as a reference to a target named "lH" and cut the link.
_URL_ENDING_IN_UNDERSCORE = re.compile(r"(https?://[^\s<>`]*?)_(?=[\s).,;:]|$)")


def _escape_url_underscores(app, what, name, obj, options, lines):
    """Keeps such a URL whole in the rendered docstring (the docstring itself stays as written)."""
    lines[:] = [_URL_ENDING_IN_UNDERSCORE.sub(r"\1\\_", line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docs)
    app.connect("autodoc-process-docstring", _escape_url_underscores)
