"""Experiments on the federation: the privacy audit, poisoning, hostile replies, the privacy sweep, crash trials and the reliability page."""
