"""Keras model builders only (explicit arguments, no globals)."""
