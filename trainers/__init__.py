"""The Stable Alignment trainer, TRL-style."""
