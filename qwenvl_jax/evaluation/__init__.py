"""Evaluation of Qwen-VL as the official `eval_mm` scripts do it (RECIPES §2): metrics, tasks, data, results.

Metrics (pure Python/numpy, no model): `cider` (CIDEr-D as pycocoevalcap, after `ptb_tokenizer`), `vqa` (VQA
accuracy with the official normalization, GQA cleanup, exact match), `anls` (DocVQA), `relaxed` (ChartQA),
`grounding` (box parsing, IoU >= 0.5), `multiple_choice` (lowest mean option CE).
"""
