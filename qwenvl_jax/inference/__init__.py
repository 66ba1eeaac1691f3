"""Inference: jitted prefill + KV-cache decoding with left-padded batches, sampling and stop words, ChatML chat
with history and streaming, drawing grounded boxes, and likelihood scoring for multiple choice.

  gen = Generator(model)
  batch = make_prompt_batch(prompts, images, pad_id=tok.eod_id, image_pad_id=cfg.image_pad_id,
                            image_tokens=cfg.image_tokens)
  new_tokens = gen.generate(batch, GenerationConfig(max_new_tokens=30, min_new_tokens=8))
  response, history = chat.chat(gen, tok, "Picture 1:<img>a.jpg</img>\\nWhat is this?")   # the `chat` module
"""
from qwenvl_jax.inference.chat import ChatReply
from qwenvl_jax.inference.chat import build_prompt
from qwenvl_jax.inference.chat import chat_generation_config
from qwenvl_jax.inference.chat import chat_stream
from qwenvl_jax.inference.chat import load_images
from qwenvl_jax.inference.decode import DEFAULT_BUCKETS
from qwenvl_jax.inference.decode import GenerationConfig
from qwenvl_jax.inference.decode import Generator
from qwenvl_jax.inference.decode import PromptBatch
from qwenvl_jax.inference.decode import bucket_length
from qwenvl_jax.inference.decode import decode_step
from qwenvl_jax.inference.decode import make_prompt_batch
from qwenvl_jax.inference.decode import prefill
from qwenvl_jax.inference.decode import trim
from qwenvl_jax.inference.draw import draw_bbox_on_latest_picture
from qwenvl_jax.inference.draw import draw_boxes
from qwenvl_jax.inference.draw import latest_image
from qwenvl_jax.inference.draw import save_new_png
from qwenvl_jax.inference.scoring import LikelihoodScorer

__all__ = [
    "bucket_length", "build_prompt", "chat_generation_config", "chat_stream", "ChatReply", "decode_step",
    "DEFAULT_BUCKETS", "draw_bbox_on_latest_picture", "draw_boxes", "GenerationConfig", "Generator", "latest_image",
    "LikelihoodScorer", "load_images", "make_prompt_batch", "prefill", "PromptBatch", "save_new_png", "trim",
]
