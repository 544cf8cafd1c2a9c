"""Algorithms over the core and storage: masks, the project's small networks, the learned-tool base, the study
classifier. No engine, no surfaces."""
