"""Synthetic long-context tasks with answers correct by construction."""
