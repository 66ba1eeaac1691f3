"""Tiny CLIP / Chinese-CLIP checkpoints written by transformers itself (random weights, the tests' own vocabularies).

`write_checkpoint(dir, family, size)` builds transformers' `CLIPModel` / `ChineseCLIPModel` with random weights
(every parameter perturbed, so a LayerNorm or bias mapped to the wrong place cannot go unnoticed), writes it with
`save_pretrained` (safetensors, or a `pytorch_model.bin` with `bin=True`), writes a tokenizer vocabulary made here
(a byte-level BPE for CLIP, a WordPiece vocab.txt for Chinese-CLIP) and a PIL image processor config. Nothing is
downloaded. Used by the clip and cleaning tests and by bench/bench_clean.py.
"""
from __future__ import annotations

import json
import pathlib

import torch
import transformers
from tokenizers import pre_tokenizers

WORDS = ("a", "red", "green", "blue", "square", "on", "the", "table", "cat", "dog", "sky", "sea", "grass", "photo",
         "of", "bus", "over", "field", "wall", "paint")
ZH_CHARS = "一只红色的狗在沙滩上绿蓝天空猫草地公交车照片"
ZH_WORDS = ("red", "green", "blue", "photo", "cat", "##s", "##ed", "a", "the", "on")


def write_clip_vocab(directory: pathlib.Path) -> int:
  """vocab.json + merges.txt of a byte-level BPE knowing `WORDS`; returns the vocabulary size (EOS is last)."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab: dict[str, int] = {}
  for ch in alphabet:
    vocab.setdefault(ch, len(vocab))
  for ch in alphabet:
    vocab.setdefault(ch + "</w>", len(vocab))
  merges: list[str] = []
  for word in WORDS:
    # Merge left to right: "r e" -> "re", "re d</w>" -> "red</w>".
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    current = pieces[0]
    for piece in pieces[1:]:
      merge = f"{current} {piece}"
      current = current + piece
      if merge not in merges:
        merges.append(merge)
      vocab.setdefault(current, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return len(vocab)


def write_bert_vocab(directory: pathlib.Path) -> int:
  """vocab.txt of a WordPiece vocabulary with Chinese characters and a few English pieces; returns its size."""
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ZH_CHARS, *ZH_WORDS, ",", ".", "!", "，", "。"]
  (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
  (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  return len(tokens)


SIZES = {
    # Two layers of width 32 on 32-px images with 8-px patches: compiles in seconds on a 2-core CPU.
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 projection_dim=16),
    # OpenAI ViT-B/32's shapes (transformers' defaults), random weights.
    "vit_b32": dict(vision={}, text={}, projection_dim=512),
}


def write_checkpoint(directory: pathlib.Path, family: str = "clip", size: str = "tiny", *, seed: int = 0,
                     bin: bool = False, squash_resize: bool = False) -> torch.nn.Module:
  """Writes a random checkpoint folder; returns the transformers model (eval mode, float32)."""
  directory.mkdir(parents=True, exist_ok=True)
  spec = SIZES[size]
  vision, text = dict(spec["vision"]), dict(spec["text"])
  torch.manual_seed(seed)
  if family == "clip":
    vocab = write_clip_vocab(directory)
    if size == "tiny":
      text["vocab_size"] = vocab
    text.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    model = transformers.CLIPModel(config)
    processor_cls = transformers.CLIPImageProcessorPil
  else:
    vocab = write_bert_vocab(directory)
    if size == "tiny":
      text["vocab_size"] = vocab
    config = transformers.ChineseCLIPConfig(text_config=text, vision_config=vision,
                                            projection_dim=spec["projection_dim"])
    model = transformers.ChineseCLIPModel(config)
    processor_cls = transformers.ChineseCLIPImageProcessorPil
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model = model.float().eval()
  model.save_pretrained(directory)
  if bin:
    # transformers 5 writes only safetensors; the old pickle format is what `torch.save` of the state dict is.
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
  image_size = config.vision_config.image_size
  if squash_resize:
    processor = processor_cls(size={"height": image_size, "width": image_size}, do_center_crop=False)
  else:
    processor = processor_cls(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})
  processor.save_pretrained(directory)
  return model
