"""The three-tier runtime: serve roles, the device pipeline, the demo."""
