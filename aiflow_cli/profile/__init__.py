"""Per-block profiling of a model on this hardware (`aiflow profile`)."""
