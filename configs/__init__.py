"""Experiment configs: one ``get_config(arg)`` file per algorithm (ml_collections)."""
