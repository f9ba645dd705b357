"""Anatomy: the MAISI label table, conversion of segmentations, body envelope, grids, the candidate-mask database and the organ HU quality check. Nothing here imports torch at file scope."""
