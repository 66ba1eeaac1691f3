"""Data pipeline: image preprocessing, sources (synthetic, JSONL, Qwen fine-tune JSON, TFDS), packing, grain."""
