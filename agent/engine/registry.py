"""The tool registry: every `Tool` subclass in a module of the `tools` package, plus the `dxagent.tools` entry points.

Adding one file to tools/ adds a tool, with no edits elsewhere. The engine knows tools only through this registry and
the protocol in agent/core/tool.py; it never imports a tool module by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from agent.core.tool import Tool

PLUGIN_PACKAGE = "tools"  # the folder of tool files (one file, one tool)


def _is_tool(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Tool) and obj is not Tool and not getattr(obj, "__abstractmethods__", None)


def discover() -> dict[str, Tool]:
    """Instantiate every tool in the `tools` package and the `dxagent.tools` entry points."""
    pkg = importlib.import_module(PLUGIN_PACKAGE)  # by name: the engine has no static import of a tool

    found: dict[str, Tool] = {}
    classes: list[type[Tool]] = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_") or mod.name in ("base",):
            continue
        module = importlib.import_module(f"{PLUGIN_PACKAGE}.{mod.name}")
        classes += [obj for obj in vars(module).values() if _is_tool(obj) and obj.__module__ == module.__name__]
    for ep in entry_points(group="dxagent.tools"):
        obj = ep.load()
        if _is_tool(obj):
            classes.append(obj)
    for cls in classes:
        tool = cls()
        if tool.name in found:
            raise RuntimeError(f"two tools are named {tool.name!r}")
        found[tool.name] = tool
    return dict(sorted(found.items()))
