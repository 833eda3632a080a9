"""
Sphinx extension: the configuration reference, generated from dftx/config.py.

``dftx.config.SECTIONS`` maps each INI section to a frozen dataclass whose
fields are the section's keys; each field was made by ``dftx.config_values.option``
and carries its parser, default, type name, help text and whether it is
required.  The ``config-reference`` directive renders one table per section
(key, type, default, meaning) from exactly that, so a key added to
config.py appears in the docs at the next build, and a removed one
disappears.

In a MyST page::

    ```{config-reference}
    ```

renders every section; ``:section: df_redis`` renders one.  Each key's row
has the anchor ``config-<section>-<key>`` (underscores kept in the text,
dashes in the id as docutils makes them), e.g. ``#config-df-redis-retries``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


@dataclasses.dataclass(frozen=True)
class Key:
    section: str
    name: str
    type: str
    default: str
    help: str
    required: bool
    secret: bool

    @property
    def anchor(self) -> str:
        return nodes.make_id(f"config-{self.section}-{self.name}")


def format_default(value: Any) -> str:
    """A default as it would be written in the INI file."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def sections() -> dict[str, tuple[str, list[Key]]]:
    """section -> (its description, its keys), in dftx.config's order."""
    from dftx import config

    out: dict[str, tuple[str, list[Key]]] = {}
    for section, cls in config.SECTIONS.items():
        doc = " ".join((cls.__doc__ or "").split())
        out[section] = (doc, list(_keys(section, cls)))
    return out


def _keys(section: str, cls: type) -> Iterator[Key]:
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        yield Key(
            section=section,
            name=f.name,
            type=meta.get("type", ""),
            default=format_default(default),
            help=meta.get("help", ""),
            required=bool(meta.get("required")),
            secret=not f.repr,
        )


def _literal_or(text: str, empty: str) -> nodes.Node:
    return nodes.literal(text=text) if text else nodes.emphasis(text=empty)


def _entry(*children: nodes.Node) -> nodes.entry:
    entry = nodes.entry()
    para = nodes.paragraph()
    para.extend(children)
    entry += para
    return entry


def _table(section: str, description: str, keys: list[Key]) -> nodes.table:
    table = nodes.table(classes=["config-reference"], ids=[nodes.make_id(f"config-{section}")])
    title = nodes.title()
    title += nodes.literal(text=f"[{section}]")
    rest = description.split(":", 1)[1].strip() if description.startswith(f"[{section}]:") \
        else description
    if rest:
        title += nodes.Text(f": {rest}")
    table += title
    group = nodes.tgroup(cols=4)
    table += group
    for width in (18, 14, 18, 50):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    row = nodes.row()
    for label in ("key", "type", "default", "meaning"):
        row += _entry(nodes.Text(label))
    head += row
    group += head
    body = nodes.tbody()
    for key in keys:
        row = nodes.row(ids=[key.anchor])
        row += _entry(nodes.literal(text=key.name))
        row += _entry(nodes.Text(key.type))
        if key.required:
            row += _entry(nodes.emphasis(text="required"))
        else:
            row += _entry(_literal_or(key.default, "empty"))
        meaning = key.help + (" (secret: not shown in logs or status)" if key.secret
                              and "never" not in key.help.lower() else "")
        row += _entry(nodes.Text(meaning))
        body += row
    group += body
    return table


class ConfigReference(SphinxDirective):
    """Tables of every [section] key of dftx/config.py."""

    has_content = False
    option_spec = {"section": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        # Rebuild the page when config.py changes.
        from dftx import config

        self.env.note_dependency(config.__file__)
        found = sections()
        wanted = self.options.get("section")
        if wanted is not None:
            if wanted not in found:
                raise self.error(
                    f"config-reference: unknown section {wanted!r} "
                    f"(dftx.config.SECTIONS has {', '.join(found)})")
            found = {wanted: found[wanted]}
        return [_table(name, doc, keys) for name, (doc, keys) in found.items()]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("config-reference", ConfigReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
