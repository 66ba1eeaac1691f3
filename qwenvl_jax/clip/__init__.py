"""A JAX CLIP dual encoder (OpenAI CLIP and Chinese-CLIP) that loads Hugging Face checkpoints; used to score
image-text pairs (cleaning's similarity filter).

Public surface:
  ClipConfig, read_config, CheckpointError       configuration from config.json (`config`)
  ClipModel, pair_similarity                     the NNX model and the per-pair cosine score (`model`)
  load_clip, check_checkpoint                    checked, streamed loading of a save_pretrained folder (`loading`)
  ImageSpec, prepare                             host-side resize + crop as the checkpoint's processor (`images`)
  TextTokenizer, load_tokenizer                  CLIP BPE / BERT WordPiece via `tokenizers` (`tokenizers`)
  ClipSimilarity                                 batched, bucketed scoring of (image, text) pairs (`similarity`)
Layering: above model/, data/ and checkpoint/; below cleaning/ (which imports it, never the reverse).
"""
from qwenvl_jax.clip.config import CheckpointError, ClipConfig, read_config
from qwenvl_jax.clip.images import ImageSpec, prepare
from qwenvl_jax.clip.loading import check_checkpoint, load_clip
from qwenvl_jax.clip.model import ClipModel, pair_similarity
from qwenvl_jax.clip.tokenizers import TextTokenizer, load_tokenizer
from qwenvl_jax.clip.similarity import ClipSimilarity
