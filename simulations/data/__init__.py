"""Interaction tables: the built-in data set, file loaders and synthetic populations."""
