"""The case index (similar-case retrieval library) over imaging and analysis."""
