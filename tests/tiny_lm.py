"""Kept for the test files that still import it; everything lives in tiny_models.py now."""
from tiny_models import RECORDS, byte_bpe_tokenizer, save_tiny_model, tiny_llama, write_records  # noqa: F401
