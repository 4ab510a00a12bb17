"""SCBench (shared-context multi-turn benchmark): data loading, scoring and results."""
