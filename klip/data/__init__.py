"""Data sources, structured text and records of the KLIP corpus."""
