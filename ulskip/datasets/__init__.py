"""Data sets built offline for fine-tuning and evaluation (records of {"prefix", "text"})."""
