"""Experiments built on training and evaluation: recipes run side by side, over seeds, reported."""
