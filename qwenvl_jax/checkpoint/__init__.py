"""PyTorch <-> Orbax weight conversion and the one params restore used by training, inference and eval.

Public surface:
* `restore_params(path, abstract_state, shardings)` / `load_model(path, cfg, mesh, rules)` — read a params
  checkpoint (a standalone Orbax PyTree checkpoint of the nested dict of our parameters) sharded onto any mesh;
* `torch_to_orbax`, `init_from_pretrained`, `orbax_to_torch` — the conversions (`python -m qwenvl_jax.convert`);
* `model_card` — what a params checkpoint records about its model (preset, image size, chat format, its own copy
  of the tokenizer) so loaders need no flags: `model_metadata`, `bundled_tokenizer` / `copy_tokenizer`,
  `hf_model_card` write it, `model_card.recorded_*` read it; `hf_generation_config` is an export's
  `generation_config.json`;
* `mapping` — the name/layout tables per source (Qwen-VL HF, Qwen-7B HF, OpenCLIP ViT-bigG);
* `open_checkpoint` — streaming reader of `*.safetensors` / `pytorch_model*.bin` checkpoints.
* `run_layout` — how a training run's steps are laid out and named (`RUN@STEP`, `RUN/checkpoints/STEP[/params]`).
"""

from qwenvl_jax.checkpoint import mapping, model_card, run_layout
from qwenvl_jax.checkpoint.conversion import (check_export_tokenizer, generation_config_note, hf_config,
                                              init_from_pretrained, missing_reference_files, model_param_shapes,
                                              orbax_to_torch, refuse_inside_source, torch_to_orbax)
from qwenvl_jax.checkpoint.model_card import (bundled_tokenizer, copy_tokenizer, hf_generation_config, hf_model_card,
                                             model_metadata)
from qwenvl_jax.checkpoint.orbax_store import ParamReader, load_model, restore_params, save_params
from qwenvl_jax.checkpoint.tensor_io import open_checkpoint

__all__ = [
    "ParamReader", "bundled_tokenizer", "check_export_tokenizer", "copy_tokenizer", "generation_config_note",
    "hf_config", "hf_generation_config", "hf_model_card", "init_from_pretrained", "load_model", "mapping",
    "missing_reference_files", "model_card", "model_metadata", "model_param_shapes", "open_checkpoint",
    "orbax_to_torch", "refuse_inside_source", "restore_params", "run_layout", "save_params", "torch_to_orbax",
]
