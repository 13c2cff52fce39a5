"""Retrieval backends. Each module registers itself with horen_fast.retrieval.register_backend."""
