"""Datasets and loaders that stream from the store."""
