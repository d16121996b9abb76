"""CLI verbs, one module each: argument parsing and printing only. Each exposes ``register(app, bench)``."""
