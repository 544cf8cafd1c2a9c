"""Core: the types everything else speaks (state, evidence, the question, the tool protocol, errors, file helpers).
Imports nothing else of the project."""
