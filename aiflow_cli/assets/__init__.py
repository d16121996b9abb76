"""Small bundled data files (a sample image for the captioner demo and tests)."""
