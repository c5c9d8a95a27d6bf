"""Settings are frozen dataclasses documented where they are declared: a one-line docstring under each field.

``Settings`` gives every such class the same few methods (changes with ``None`` meaning "keep", a dict form,
a checked construction from a dict, its fields' docstrings), so that functions can take a settings object
and keyword overrides alike, and the command line can derive its options and help texts from the classes.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import asdict, fields, replace
from typing import Any, Self

from circuitmap.errors import CircuitmapError


class Settings:
    """Methods shared by the settings dataclasses (each subclass is a frozen ``@dataclass``)."""

    def with_changes(self, **changes: Any) -> Self:
        """A copy with the given fields changed; ``None`` leaves a field as it is."""
        known = {field.name for field in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise CircuitmapError(f"unknown {type(self).__name__} settings: {', '.join(unknown)}")
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Self:
        """The settings in ``values``, refusing names the class does not have."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CircuitmapError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's docstring (the string literal right under it), by field name."""
        return field_docs(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields of dataclass ``cls`` (and of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__dataclass_fields__" not in vars(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for statement, following in zip(body, body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs
