"""Storage over the core: the trace store, the artifact store, the model store and its cards."""
