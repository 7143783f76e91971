"""Datasets, image loading and downloads."""
