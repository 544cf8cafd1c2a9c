"""The one error tree.

* `DxagentError`: the base of every error the project raises on purpose (a bug is any other exception).
* `UserError(DxagentError)`: something the user can fix (a bad file, a malformed manifest, an unreachable endpoint,
  a model card that does not verify). Its message is one line; the CLI prints `error: <message>` and exits 2, a
  batch or eval records it for that case and goes on.
* `ToolError(DxagentError)` (agent/core/tool.py): a tool could not do what was asked; the message goes into the
  evidence and the report, the run goes on.
* `ControlSignal`: not an error at all. It steers control flow (a chat user's cancel, agent/engine/graph.py
  `TurnCancelled`) and is never recorded as a failure. It derives from `BaseException`, apart from the tree above, so
  that no `except Exception` (a tool's, the planner's retry loop) swallows it.

Each concrete error keeps the builtin base it always had (`ValueError` for bad input, `RuntimeError` for a failing
component), so callers that catch those still do.
"""

from __future__ import annotations


class DxagentError(Exception):
    """Raised on purpose by dxagent; the message is one line."""


class UserError(DxagentError):
    """The user can fix it: the CLI prints the one line and exits 2."""


class ManifestError(UserError, ValueError):
    """A batch or eval manifest cannot be read or names a case badly; one line says which row and why."""


class SettingError(UserError, ValueError):
    """An environment setting (DXAGENT_...) holds something it cannot mean; the message names it."""


class ControlSignal(BaseException):  # noqa: N818 - a signal, not an error
    """Steers control flow; never recorded as a failure (see the module docstring)."""
