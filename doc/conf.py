"""Sphinx configuration of the dftx documentation (Markdown pages, MyST).

Build: ``make docs`` (``python -m sphinx -W --keep-going -b html doc doc/_build/html``).
tests/test_docs.py builds it with ``-W`` too, so a warning fails the tests.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))   # configref
sys.path.insert(0, os.path.dirname(HERE))        # dftx, for configref

project = "dftx"
author = "the dftx developers"
copyright = "the dftx developers"

extensions = ["myst_parser", "configref"]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "examples", "Thumbs.db", ".DS_Store"]

# Headings get anchors, so `page.md#some-heading` links resolve.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Keep ' and " as typed: the pages quote code, keys and JSON, and the
# configuration reference must read exactly like dftx/config.py's help text.
smartquotes = False

html_theme = "alabaster"
html_static_path = []
html_show_sourcelink = False

