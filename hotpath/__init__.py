"""Hot path."""
