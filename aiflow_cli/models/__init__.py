"""Models as chains of stages: one adapter per family, built-in configs, loaders."""
