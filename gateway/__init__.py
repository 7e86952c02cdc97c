"""The hongbao gateway."""
