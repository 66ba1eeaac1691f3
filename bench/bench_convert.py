"""Wall time and peak RSS of the weight conversion, both ways, next to the time to just read the files.

  python bench/bench_convert.py --dir=/tmp/bench_convert --preset=qwen_vl_7b   # ~19 GB per copy on disk
  python bench/bench_convert.py --dir=/tmp/bench_convert --preset=mid

Steps (each in its own child process; peak RSS is the child's ru_maxrss from wait4, so it includes the
interpreter, jax/torch/orbax imports and any file pages mapped in):
  0. import-only   python + the conversion imports, nothing read (the floor under every figure);
  1. write         a random checkpoint in the reference format (`--format=bin`: 10 `pytorch_model-*.bin` shards +
                   index, as released; or safetensors), reference names and shapes, bf16;
  2. read torch    every tensor read once through the converter's reader and dropped (the I/O floor);
  3. torch->orbax  `torch_to_orbax`;
  4. read orbax    every parameter read once (per layer for scanned ones) from the params checkpoint;
  5. orbax->torch  `orbax_to_torch` (bf16 safetensors shards + index + config.json).
The source is deleted after step 3 unless --keep (three copies of the 7B model need ~58 GB). Random values come
from one 64 MiB pool, so writing the checkpoint is I/O-bound rather than RNG-bound. The page cache is not
dropped (that needs root): steps 2 and 3 read the same files in the same cache state, as do 4 and 5.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

_CHILD = r"""
import os, sys, time, json
os.environ.setdefault("JAX_PLATFORMS", "cpu")
step, root, preset, fmt, shards = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
import numpy as np

from qwenvl_jax import checkpoint
from qwenvl_jax.checkpoint import mapping, orbax_store, tensor_io
from qwenvl_jax.model.config import get_preset
cfg = get_preset(preset)
root = __import__("pathlib").Path(root)
t0 = time.perf_counter()
nbytes = 0
if step == "import":
  pass
elif step == "write":
  import torch
  shapes = {k: s for k, (s, _) in checkpoint.model_param_shapes(cfg).items()}
  bindings = mapping.bind(mapping.QWENVL, shapes)
  pool = np.random.default_rng(0).standard_normal(32 * 2**20, dtype=np.float32).astype(tensor_io.BF16)
  sizes = [int(np.prod(b.torch_shape)) * 2 for b in bindings]
  per_shard = sum(sizes) / shards
  groups, acc = [[]], 0
  for b, s in zip(bindings, sizes):
    if groups[-1] and acc + s > per_shard * len(groups) and len(groups) < shards:
      groups.append([])
    groups[-1].append(b)
    acc += s
  src = root / "torch"
  src.mkdir(parents=True)
  weight_map, offset = {}, 0
  for k, group in enumerate(groups, start=1):
    tensors = {}
    for b in group:
      n = int(np.prod(b.torch_shape))
      start = offset % pool.size
      base = np.concatenate([pool[start:], pool[:start]])
      data = np.resize(base, n) if n > base.size else base[:n].copy()
      offset += 7919
      tensors[b.torch_name] = torch.from_numpy(data.view(np.int16).reshape(b.torch_shape)).view(torch.bfloat16)
      nbytes += n * 2
    if fmt == "bin":
      name = f"pytorch_model-{k:05d}-of-{len(groups):05d}.bin"
      torch.save(tensors, src / name)
    else:
      from safetensors.torch import save_file
      name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
      save_file(tensors, str(src / name), metadata={"format": "pt"})
    weight_map.update({n: name for n in tensors})
    del tensors
  index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
  (src / index).write_text(json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}))
elif step == "read_torch":
  with tensor_io.open_checkpoint(root / "torch") as source:
    for name in source.names():
      nbytes += source.read(name).nbytes
elif step == "torch_to_orbax":
  checkpoint.torch_to_orbax(root / "torch", root / "orbax", cfg)
elif step == "read_orbax":
  reader = orbax_store.ParamReader(root / "orbax")
  for name, (shape, dtype) in reader.shapes.items():
    scanned = name.split(".")[1] == "blocks"
    for i in range(shape[0] if scanned else 1):
      nbytes += reader.read(name, (i,) if scanned else ()).nbytes
elif step == "orbax_to_torch":
  checkpoint.orbax_to_torch(root / "orbax", root / "export", cfg)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": nbytes}))
"""


def _du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_step(step: str, args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, step, str(args.dir), args.preset, args.format,
                           str(args.shards)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  out, err = proc.stdout.read(), proc.stderr.read()
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"step {step} failed:\n{err[-4000:]}")
  inner = json.loads(out.strip().splitlines()[-1])
  return {"step": step, "wall_s": wall, "work_s": inner["seconds"], "peak_rss_gib": usage.ru_maxrss / 2**20,
          "bytes": inner["bytes"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/bench_convert"),
                      help="work directory (must not exist; removed at the end unless --keep)")
  parser.add_argument("--preset", default="qwen_vl_7b", choices=["qwen_vl_7b", "mid", "tiny"])
  parser.add_argument("--format", default="bin", choices=["bin", "safetensors"])
  parser.add_argument("--shards", type=int, default=10)
  parser.add_argument("--keep", action="store_true", help="keep every copy (needs 3x the model size on disk)")
  parser.add_argument("--reuse_source", action="store_true",
                      help="--dir holds only a torch/ checkpoint from an earlier run of this preset: skip writing it")
  args = parser.parse_args()
  if args.reuse_source:
    if sorted(p.name for p in args.dir.iterdir()) != ["torch"]:
      parser.error(f"--reuse_source needs {args.dir} to hold only torch/")
  elif args.dir.exists():
    parser.error(f"{args.dir} exists; pass a new directory")
  args.dir.mkdir(parents=True, exist_ok=args.reuse_source)
  free = shutil.disk_usage(args.dir).free
  print(f"preset {args.preset}, format {args.format}, {args.shards} shards, dir {args.dir} "
        f"({free / 1e9:.0f} GB free)", flush=True)
  results = []
  try:
    for step in ("import", "write", "read_torch", "torch_to_orbax", "read_orbax", "orbax_to_torch"):
      if step == "write" and args.reuse_source:
        continue
      if step == "read_orbax" and not args.keep:
        shutil.rmtree(args.dir / "torch")
      r = run_step(step, args)
      results.append(r)
      size = {"write": _du(args.dir / "torch"), "torch_to_orbax": _du(args.dir / "orbax"),
              "orbax_to_torch": _du(args.dir / "export")}.get(step)
      gb = f", wrote {size / 1e9:.2f} GB" if size else (f", read {r['bytes'] / 1e9:.2f} GB" if r["bytes"] else "")
      print(f"{step:>15}: wall {r['wall_s']:7.1f} s (work {r['work_s']:7.1f} s), "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB{gb}", flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
