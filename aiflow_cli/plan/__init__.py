"""The partition + codec solver (`aiflow plan`)."""
