"""Hierarchical chain-of-thought (HCoT) text generation: five levels, two backends."""
