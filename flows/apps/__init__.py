"""User-facing apps on a trained model: `predict` (score files) and `screen` (wide-field photos)."""
