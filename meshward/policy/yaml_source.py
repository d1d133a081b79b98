"""Composing YAML into a node tree, with the line of a syntax error.

The policy loader and the policy-test reader both read YAML as nodes (so values keep
their lines) and both report a syntax error as ``file:line``; this is the one place
that turns PyYAML's exceptions into that line and problem text.
"""

from __future__ import annotations

import yaml
from yaml.nodes import Node


class YamlSyntaxError(Exception):
    """Invalid YAML: ``line`` is 1-based (0 when PyYAML gives no position)."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem


def compose(text: str) -> Node | None:
    """The YAML node tree of ``text`` (None for an empty document)."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlSyntaxError(
            mark.line + 1 if mark else 0, exc.problem or exc.context or "invalid YAML"
        ) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(0, str(exc)) from None
