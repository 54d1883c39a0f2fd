"""TFDS builders writing the KLIP record schema to ArrayRecord; one module per dataset.

Each module exposes `builder(data_dir, **options)`; `klip.data.prepare` picks the module by name.
"""
