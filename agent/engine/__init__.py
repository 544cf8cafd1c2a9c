"""The engine: tool registry, graph, planner, critic, answer and report composition, session, replay, tool worker.
Knows tools only through the registry and the protocol in agent.core.tool."""
