"""Checkpoint I/O, merge methods (pure tensor functions) and the streaming merge executor."""
