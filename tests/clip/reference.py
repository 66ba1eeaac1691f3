"""transformers' own preprocessing, tokenization and forward pass: the independent side of every comparison."""
import pathlib
from typing import Sequence

import numpy as np
import PIL.Image
import torch
import transformers


def processor(folder: pathlib.Path, family: str):
  """The PIL image processor transformers reads from the checkpoint's preprocessor_config.json."""
  cls = transformers.CLIPImageProcessorPil if family == "clip" else transformers.ChineseCLIPImageProcessorPil
  return cls.from_pretrained(folder)


def tokenizer(folder: pathlib.Path, family: str):
  cls = transformers.CLIPTokenizer if family == "clip" else transformers.BertTokenizer
  return cls.from_pretrained(folder)


def forward(model, folder: pathlib.Path, family: str, images: Sequence[PIL.Image.Image], texts: Sequence[str],
            max_length: int):
  """transformers' outputs (image_embeds, text_embeds, logits_per_image) as float32 numpy."""
  pixels = processor(folder, family)(images=list(images), return_tensors="pt")["pixel_values"]
  enc = tokenizer(folder, family)(list(texts), padding="max_length", truncation=True, max_length=max_length,
                                  return_tensors="pt")
  with torch.no_grad():
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def pair_scores(model, folder: pathlib.Path, family: str, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                max_length: int) -> np.ndarray:
  """float32[B]: transformers' cosine similarity of images[b] and texts[b]."""
  image, text, _ = forward(model, folder, family, images, texts, max_length)
  return np.sum(image * text, axis=-1)
