"""Synthetic training data: a general model writes rows for a custom model; `filters` judges them."""
