"""KLIP models: ViT image tower, Transformer text tower and the two-tower model."""
