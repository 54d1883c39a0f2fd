"""KLIP: vision-language pretraining on SAR imagery."""
