"""Where does a trained tiny model lose the position of a shape? Linear probes of its 3x3 cell.

  JAX_PLATFORMS=cpu python bench/probe_adapter_position.py --run=WORKDIR/run --step=8000

For one-shape synthetic scenes (`synthetic_max_shapes=1`, 56 px by default) it fits a ridge-regression probe of
the shape's cell (3x3 grid, chance ~0.12) on 800 images and prints its accuracy on 400 others, from the ViT patch
features, from the adapter's image tokens (all of them, and their mean) and from raw pixels, for the checkpoint
and for a freshly initialized model. If the ViT keeps the cell but the image tokens do not, the adapter threw
the position away (`bench_synthetic_eval.py` trains such runs).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qwenvl_jax.data.synthetic import synthetic_record  # noqa: E402
from qwenvl_jax.evaluation import grounding  # noqa: E402
from qwenvl_jax import text  # noqa: E402
from qwenvl_jax.inference import loading  # noqa: E402
from qwenvl_jax.model import QwenVL  # noqa: E402

NUM_FIT, NUM_TEST = 800, 400


def scenes(size: int, seed: int = 777) -> tuple[np.ndarray, np.ndarray]:
  """uint8[N, S, S, 3] one-shape images and the shape's cell (row * 3 + column) of each."""
  images, cells = [], []
  for i in range(NUM_FIT + NUM_TEST):
    record = synthetic_record(i, task="grounding", image_size=size, seed=seed, max_shapes=1)
    x1, y1, x2, y2 = grounding.parse_box(record.turns[1][1])
    cells.append(int((y1 + y2) / 2000 * 3) * 3 + int((x1 + x2) / 2000 * 3))
    images.append(np.asarray(record.images[0]))
  return np.stack(images), np.asarray(cells)


def probe_accuracy(features: np.ndarray, cells: np.ndarray, ridge: float = 1.0) -> float:
  """Held-out accuracy of a ridge-regression one-vs-all probe fitted on the first NUM_FIT rows."""
  z = features.reshape(len(features), -1).astype(np.float64)
  z = (z - z[:NUM_FIT].mean(0)) / (z[:NUM_FIT].std(0) + 1e-6)
  z = np.concatenate([z, np.ones((len(z), 1))], 1)
  targets = np.eye(9)[cells]
  w = np.linalg.solve(z[:NUM_FIT].T @ z[:NUM_FIT] + ridge * np.eye(z.shape[1]), z[:NUM_FIT].T @ targets[:NUM_FIT])
  return float((np.argmax(z[NUM_FIT:] @ w, 1) == cells[NUM_FIT:]).mean())


def features(model: QwenVL, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  vit, tokens = [], []
  for k in range(0, len(images), 100):
    batch = jnp.asarray(images[k:k + 100])
    vit.append(np.asarray(model.visual(batch)))
    tokens.append(np.asarray(model.encode_images(batch[:, None]))[:, 0])
  return np.concatenate(vit), np.concatenate(tokens)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", required=True, help="a trainer workdir (holds tokenizer.model and checkpoints/)")
  parser.add_argument("--step", required=True)
  parser.add_argument("--res", type=int, default=56)
  args = parser.parse_args()
  run = pathlib.Path(args.run)
  tok = text.load_tokenizer(str(run / "tokenizer.model"))
  cfg = loading.model_config("tiny", tok, dtype="float32", image_size=args.res)
  mesh, rules = loading.inference_mesh()
  trained = loading.load_model(cfg, str(run / "checkpoints" / args.step / "params"), mesh, rules)
  images, cells = scenes(args.res)
  print(f"cell probe accuracy on {NUM_TEST} held-out one-shape images (most frequent cell: "
        f"{np.bincount(cells).max() / len(cells):.3f})")
  print(f"  raw pixels                       {probe_accuracy(images, cells):.3f}")
  for name, model in (("step " + args.step, trained), ("init", QwenVL(cfg, rngs=nnx.Rngs(0)))):
    vit, tokens = features(model, images)
    print(f"  {name:8s} ViT patches              {probe_accuracy(vit, cells):.3f}")
    print(f"  {name:8s} image tokens (all 16)    {probe_accuracy(tokens, cells):.3f}")
    print(f"  {name:8s} image tokens (mean)      {probe_accuracy(tokens.mean(1), cells):.3f}")


if __name__ == "__main__":
  main()
