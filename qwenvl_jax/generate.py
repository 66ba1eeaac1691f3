"""Answer a prompt about images: `python -m qwenvl_jax.generate`.

  python -m qwenvl_jax.generate --checkpoint=ckpt/params --tokenizer=../shared/data/qwen.tiktoken \\
      --image=a.jpg --image=b.png --prompt="What is the difference between the pictures?"
  python -m qwenvl_jax.generate --model=tiny --tokenizer=sp.model --image=a.png --prompt="Describe it."   # random

Chat mode (default, for Qwen-VL-Chat) wraps the images (by absolute path, so that a saved history works from any
folder) and prompt as `Picture k:<img>…</img>\\n…` in ChatML after `--history` (a JSON list of [query, response] pairs,
oldest first); `--chat_format=raw` feeds the base model the same text without ChatML. The answer streams to stdout. When
it holds boxes, the latest picture with the boxes and labels drawn is written as a PNG to `--output_image` (default
`<image stem>_boxes.png` next to that picture, with `_1`, `_2`, … added rather than replacing a file). `--save_history`
writes the updated history as JSON to a new file.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata

from absl import app, flags

from qwenvl_jax import cli, errors, new_files

FLAGS = flags.FLAGS
cli.define_model_flags()  # checkpoint, model, tokenizer, image_size, chat_format, dtype, quantize, rules, ...
flags.DEFINE_multi_string("image", [], "Image file(s), in order (Picture 1, 2, ...).")
flags.DEFINE_string("prompt", None, "The question or instruction.", required=True)
flags.DEFINE_string("history", None, "JSON file with the chat history: [[query, response], ...].")
flags.DEFINE_string("save_history", None, "Write the updated history to this new JSON file.")
flags.DEFINE_string("system", "You are a helpful assistant.", "System message (chatml).")
flags.DEFINE_string("output_image", None, "PNG path for the picture with the answer's boxes (must not exist).")
flags.DEFINE_integer("max_new_tokens", 512, "Most tokens to generate.")
flags.DEFINE_bool("do_sample", False, "Sample (Qwen-VL-Chat's default: --do_sample --top_p=0.3) or greedy.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Top-k filter when sampling (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus filter when sampling (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed (and the random weights' seed).")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "KV cache storage: the compute dtype, or int8.")


def _read_history(path: str | None) -> list[tuple[str, str]]:
  if not path:
    return []
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise errors.InputFormatError(f"history file {path}: not valid JSON ({e})") from e
  if not isinstance(data, list) or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                           for t in data):
    raise errors.InputFormatError(f"history file {path}: expected a JSON list of [query, response] string pairs")
  return [tuple(t) for t in data]


def _missing_pictures(history: list[tuple[str, str]]) -> list[tuple[int, str]]:
  """(turn index, path) of each picture the history names that is not here (the path as the tokenizer reads it
  back)."""
  from qwenvl_jax import text as qtext  # pylint: disable=import-outside-toplevel
  return [(i, image) for i, (query, _) in enumerate(history) for image in qtext.IMAGE_SPAN.findall(query)
          if not os.path.isfile(unicodedata.normalize("NFC", image))]


def _refuse_missing_pictures(missing: list[tuple[int, str]], path: str, first_kept: int = 0) -> None:
  """One line for the first missing picture of a turn the prompt keeps (turns before `first_kept` are left out of
  the window: their pictures are never read)."""
  kept = [(i, image) for i, image in missing if i >= first_kept]
  if kept:
    i, image = kept[0]
    raise errors.UserFileNotFoundError(
        f"history file {path}, turn {i + 1}: picture {image} does not exist",
        hint=None if os.path.isabs(image) else
        "a relative path is read from the current folder: run from the folder the chat started in")


def _dropped_turns(source, query: str, history: list[tuple[str, str]]) -> int:
  """How many of the oldest history turns the prompt's window leaves out, from the tokenizer and the model's config
  alone (before the weights load)."""
  from qwenvl_jax import text as qtext  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import chat, loading  # pylint: disable=import-outside-toplevel
  tok, cfg = loading.source_config(source, dtype=FLAGS.dtype)
  return chat.conversation_context(tok, query, history, system=FLAGS.system,
                                   max_window_size=qtext.DEFAULT_MAX_WINDOW_SIZE, chat_format=source.chat_format,
                                   n_image_tokens=cfg.image_tokens).dropped_turns


def _image_path(path: str) -> str:
  """The absolute path the query names, so that the saved history works from any folder (the model sees only
  the image, never the path text)."""
  if os.path.isdir(path):
    raise errors.UserFileNotFoundError(f"--image={path} is a folder, not an image file")
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f"--image={path}: image file does not exist")
  full = os.path.abspath(path)
  # The tokenizer NFC-normalizes the prompt (as the reference's), the folders of the absolute path included: the
  # file read back must be this one (a macOS file system finds it under either form; Linux may not).
  try:
    full.encode("utf-8")
    read_back = unicodedata.normalize("NFC", full)
    same = os.path.isfile(read_back) and os.path.samefile(read_back, full)
  except (UnicodeEncodeError, OSError):
    same = False
  if not same:
    raise errors.ConfigError(f"--image={path!r}: its absolute path {full!r} is not NFC-normalized UTF-8, and the "
                             "prompt's text is, so another (missing) file would be read",
                             hint="rename the file or its folders, or link it under an NFC name")
  return full


def _free_png_path(image: str) -> str:
  """`<image stem>_boxes.png` next to the picture, with `_1`, `_2`, ... added instead of replacing a file."""
  stem = os.path.splitext(image)[0]
  path, k = f"{stem}_boxes.png", 0
  while os.path.exists(path):
    k += 1
    path = f"{stem}_boxes_{k}.png"
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  ignored = [name for name in ("temperature", "top_k", "top_p") if FLAGS[name].present]
  if ignored and not FLAGS.do_sample:
    raise errors.ConfigError(f"--{ignored[0]} sets sampling, and without --do_sample the answer is greedy",
                             hint="add --do_sample (Qwen-VL-Chat's own setting: --do_sample --top_p=0.3)")
  for path in (FLAGS.output_image, FLAGS.save_history):
    if path and os.path.exists(path):
      raise FileExistsError(f"{path} already exists; it is never overwritten: choose another path")
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      raise errors.UserFileNotFoundError(f"{path}: its folder does not exist")  # found now, not after the answer
  images = [_image_path(path) for path in FLAGS.image]

  import jax  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import inference, sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import text as qtext  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.data import images as image_lib  # pylint: disable=import-outside-toplevel

  for path in images:  # a file that is not an image is found now, not after the model has loaded
    image_lib.open_image(path)

  # The settings are checked before the weights load (minutes at full size); the tokenizer's ids come later.
  settings = dict(max_new_tokens=FLAGS.max_new_tokens, do_sample=FLAGS.do_sample, temperature=FLAGS.temperature,
                  top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  inference.GenerationConfig(**settings)
  history = _read_history(FLAGS.history)
  missing = _missing_pictures(history)
  source = cli.model_source_from_flags()
  if source.chat_format == "raw" and (history or FLAGS["system"].present):
    raise errors.ConfigError("--history and --system need a chat model: this one uses the raw (base model) format, "
                             "which has no turns and no system message",
                             hint="a chat-tuned checkpoint, or --chat_format=chatml if this one was trained so")
  query = qtext.from_list_format([{"image": p} for p in images] + [{"text": FLAGS.prompt}])
  if missing:  # only the turns the window keeps need their pictures; which ones, the tokenizer tells
    _refuse_missing_pictures(missing, FLAGS.history, _dropped_turns(source, query, history))
  # The loaders enter the mesh themselves, after the abstract (mesh-free) trace: built outside `use_rules`.
  source, tok, _, mesh, rules, model = cli.load_model_from_flags(source)
  gen_cfg = inference.chat_generation_config(tok, source.chat_format, **settings)
  with sharding.use_rules(mesh, rules):
    generator = inference.Generator(model, kv_cache_dtype=None if FLAGS.kv_cache_dtype == "auto" else "int8")
    reply = inference.chat_stream(generator, tok, query, history, system=FLAGS.system,
                                  chat_format=source.chat_format, gen=gen_cfg, key=jax.random.key(FLAGS.seed))
    if reply.dropped_turns:
      print(f"note: the {reply.dropped_turns} oldest of the history's {len(history)} turns do not fit the "
            f"{qtext.DEFAULT_MAX_WINDOW_SIZE}-token window and are left out of the prompt (the saved history keeps "
            "them)", file=sys.stderr)
    for delta in reply:
      sys.stdout.write(delta)
      sys.stdout.flush()
  sys.stdout.write("\n")
  sys.stdout.flush()

  if not reply.response.strip():
    print("note: the answer is empty (the model ended it at once)", file=sys.stderr)
  tags, parsed = reply.response.count("<box>"), len(qtext.parse_boxes(reply.response, strict=False))
  if tags > parsed:
    print(f"note: {tags - parsed} of the answer's {tags} boxes are malformed (not two points in [0, 1000)) and are "
          "not drawn", file=sys.stderr)
  _write_outputs(reply.response, reply.history, FLAGS.output_image, FLAGS.save_history,
                 first_kept=reply.dropped_turns)


def _write_outputs(response: str, history: list[tuple[str, str]], output_image: str | None,
                   save_history: str | None, first_kept: int = 0) -> None:
  """The history first, then the picture with the answer's boxes: a picture that cannot be read or written (a
  path the answer names, a read-only folder) fails after the turn is saved, never losing it. The boxes go on the
  latest picture of the turns the prompt kept (from `first_kept` on): the model never saw those before."""
  from qwenvl_jax import inference  # pylint: disable=import-outside-toplevel
  if save_history:
    with new_files.open_new(save_history) as f:  # a failed write (disk full, Ctrl-C) leaves no half a history
      json.dump([list(t) for t in history], f, ensure_ascii=False, indent=1)
  seen = history[first_kept:]
  drawn = inference.draw_bbox_on_latest_picture(response, seen)
  if drawn is not None:
    path = output_image or _free_png_path(inference.latest_image(response, seen))
    inference.save_new_png(drawn, path)
    print(f"boxes drawn on the latest picture: {path}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
