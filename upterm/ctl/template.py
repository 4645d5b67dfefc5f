"""``-o template=...``: a session's JSON fields put into a line of text.

Its own small module: the shell prompt's fast path (:mod:`upterm.ctl.prompt`) renders
templates without importing the rest of the client.
"""

from __future__ import annotations

from _string import formatter_parser  # type: ignore[import-not-found]  # no re import

# No typing import at run time (it imports re): the prompt's fast path pays for each import.


def _as_str(value: object) -> str:
    return str(value)


_CONVERSIONS = {"s": _as_str, "r": repr, "a": ascii}


def render_template(template: str, info: dict[str, object]) -> str:
    """Fill ``{field}`` placeholders (``{{`` for a brace) from a session's JSON fields.

    Only plain field names are allowed, so a template cannot reach into Python objects.
    Values print as ``-o json`` prints them (``true``, not ``True``).
    """
    out = []
    for literal, field_name, spec, conversion in formatter_parser(template):
        out.append(literal)
        if field_name is None:
            continue
        if field_name not in info:
            known = ", ".join(sorted(info))
            raise ValueError(f"unknown field {{{field_name}}} in the template; fields: {known}")
        value = info[field_name]
        if conversion:
            value = _CONVERSIONS[conversion](value)
        if isinstance(value, bool | list | dict) and not spec:
            import json  # only when such a field is asked for: the prompt path stays light

            value = json.dumps(value)
        out.append(format("" if value is None else value, spec or ""))
    return "".join(out)
