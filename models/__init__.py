"""Preference models, losses, negative sampling and ranking metrics; the shared/private split of every model."""
