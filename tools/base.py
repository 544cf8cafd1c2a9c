"""The import path for third-party tools: `from tools.base import Tool, ToolInput, ...`.

The protocol itself lives in agent/core/tool.py (the core layer); this module only re-exports it, so a plugin written
against `tools.base` keeps working. Tools in this folder import agent.core.tool directly.
"""

from agent.core.tool import (
    COORDINATE_ARGS,
    USER_ONLY,
    ArtifactSink,
    FindingDraft,
    Measurement,
    Tool,
    ToolContext,
    ToolError,
    ToolInput,
)

__all__ = ["COORDINATE_ARGS", "USER_ONLY", "ArtifactSink", "FindingDraft", "Measurement", "Tool", "ToolContext",
           "ToolError", "ToolInput"]
