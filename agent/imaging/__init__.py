"""Imaging I/O: format loaders, de-identification, the modality guess, view building, display helpers."""
