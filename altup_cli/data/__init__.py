"""Corpora, tokenizers and packed token sequences (no Lightning here but the DataModule)."""
