"""Text side of Qwen-VL: tokenizers, multimodal prompt formatting, ChatML and loss labels (DESIGN.md §3).

Tokenizers (`Tokenizer` protocol): `QwenTokenizer` (tiktoken, `qwen.tiktoken`, the reference ids) and
`SentencePieceTokenizer` (same special-token surface forms, for models trained from scratch; train one with
`train_sentencepiece`). Formatting: `from_list_format`, `encode_with_images` (image spans + paths), boxes,
`parse_boxes`. Chat: `make_context`, `get_stop_words_ids`, `decode_tokens`. Labels: `pretrain_example`,
`sft_example`, `shift_labels`.
"""
from qwenvl_jax.text.chat import CHAT_TOP_K
from qwenvl_jax.text.chat import CHAT_TOP_P
from qwenvl_jax.text.chat import chat_template
from qwenvl_jax.text.chat import ChatContext
from qwenvl_jax.text.chat import DEFAULT_MAX_WINDOW_SIZE
from qwenvl_jax.text.chat import DEFAULT_SYSTEM
from qwenvl_jax.text.chat import decode_tokens
from qwenvl_jax.text.chat import get_stop_words_ids
from qwenvl_jax.text.chat import make_context
from qwenvl_jax.text.chat import WindowedContext
from qwenvl_jax.text.chat import windowed_context
from qwenvl_jax.text.formatting import BoxRef
from qwenvl_jax.text.formatting import EncodedText
from qwenvl_jax.text.formatting import IMAGE_SPAN
from qwenvl_jax.text.formatting import IMAGE_TOKENS
from qwenvl_jax.text.formatting import MalformedBoxError
from qwenvl_jax.text.formatting import PICTURE_PREFIX
from qwenvl_jax.text.formatting import PICTURE_PREFIX_README
from qwenvl_jax.text.formatting import box_to_text
from qwenvl_jax.text.formatting import decode_with_images
from qwenvl_jax.text.formatting import denormalize_box
from qwenvl_jax.text.formatting import encode_with_images
from qwenvl_jax.text.formatting import from_list_format
from qwenvl_jax.text.formatting import image_span_ids
from qwenvl_jax.text.formatting import normalize_box
from qwenvl_jax.text.formatting import parse_box
from qwenvl_jax.text.formatting import parse_boxes
from qwenvl_jax.text.formatting import quad_to_text
from qwenvl_jax.text.formatting import strip_grounding
from qwenvl_jax.text.formatting import to_list_format
from qwenvl_jax.text.masks import IGNORE_INDEX
from qwenvl_jax.text.masks import Example
from qwenvl_jax.text.masks import pretrain_example
from qwenvl_jax.text.masks import sft_example
from qwenvl_jax.text.masks import shift_labels
from qwenvl_jax.text.sentencepiece_tokenizer import SentencePieceTokenizer
from qwenvl_jax.text.sentencepiece_tokenizer import train_sentencepiece
from qwenvl_jax.text.spec import load_tokenizer
from qwenvl_jax.text.spec import parse_tokenizer_spec
from qwenvl_jax.text.tokenizer import ENDOFTEXT
from qwenvl_jax.text.tokenizer import IMG_END
from qwenvl_jax.text.tokenizer import IMG_PAD
from qwenvl_jax.text.tokenizer import IMG_START
from qwenvl_jax.text.tokenizer import min_tokens
from qwenvl_jax.text.tokenizer import QwenTokenizer
from qwenvl_jax.text.tokenizer import Tokenizer

__all__ = [
    "box_to_text", "BoxRef", "CHAT_TOP_K", "CHAT_TOP_P", "chat_template", "ChatContext", "decode_tokens",
    "decode_with_images",
    "DEFAULT_MAX_WINDOW_SIZE",
    "DEFAULT_SYSTEM", "denormalize_box", "encode_with_images", "EncodedText", "ENDOFTEXT", "Example",
    "from_list_format", "IMG_END", "IMG_PAD", "IMG_START",
    "get_stop_words_ids", "IGNORE_INDEX", "image_span_ids", "IMAGE_SPAN", "IMAGE_TOKENS", "load_tokenizer",
    "make_context", "MalformedBoxError", "min_tokens", "normalize_box", "parse_box", "parse_boxes",
    "parse_tokenizer_spec", "PICTURE_PREFIX", "PICTURE_PREFIX_README", "pretrain_example", "quad_to_text",
    "QwenTokenizer", "SentencePieceTokenizer", "sft_example", "shift_labels", "strip_grounding", "to_list_format",
    "Tokenizer", "train_sentencepiece", "windowed_context", "WindowedContext",
]
