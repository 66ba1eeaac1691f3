"""Issue 17, fast checks: a bad config is refused before anything is written; a workdir that is a file is named;
metrics rows past the restored step are dropped on resume (each step logged once)."""
import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import errors
from qwenvl_jax.checkpoint import orbax_store
from qwenvl_jax.model import quantize as qlib
from qwenvl_jax.model import tiny
from qwenvl_jax.training import metrics, peft, train, validation
from qwenvl_jax.training import workdir as workdir_lib
from qwenvl_jax.training.stage_config import stage_config
from tests.training.helpers import load_stage_config, small_config


@pytest.mark.parametrize("overrides,message", [
    ({"res": 0}, r"config\.res"),
    ({"res": 50}, r"multiple of patch_size"),
    ({"model": "tiny_typo"}, r"unknown model preset 'tiny_typo'"),
    ({"tokenizer": "qwen:/nowhere/qwen.tiktoken"}, r"/nowhere/qwen\.tiktoken"),
    ({"tokenizer": "tiktoken:x"}, r"config\.tokenizer='tiktoken:x'"),
    ({"data.source": "jsonl:/nowhere/pairs.jsonl"}, r"/nowhere/pairs\.jsonl"),
    ({"data.source": "parquet:/x"}, r"unknown source spec"),
    ({"batch_size": 7}, r"does not divide over the 8 data-parallel devices"),
    ({"checkpoint.every": 0}, r"config\.checkpoint\.every=0"),
    ({"seq_len": 1}, r"config\.seq_len=1"),
    ({"optimizer.schedule": "linear"}, r"config\.optimizer\.schedule='linear'"),
    ({"resume": "sometimes"}, r"config\.resume='sometimes'"),
    ({"cpu_options": "yes"}, r"config\.cpu_options='yes'"),
    ({"attention_impl": "cudnn"}, r"config\.attention_impl='cudnn'.*needs an NVIDIA GPU.*'cpu'"),
    ({"attention_impl": "splash"}, r"config\.attention_impl='splash'.*TPU kernel.*'cpu'"),
    ({"attention_impl": "flash"}, r"unknown attention_impl 'flash'"),
    ({"synthetic_vocab_size": 10}, r"config\.synthetic_vocab_size=10"),
    ({"lora.rank": 8, "lora.base_quantize": "fp4"}, r"config\.lora\.base_quantize='fp4'"),
    ({"lora.base_quantize": "nf4"}, r"needs LoRA adapters"),
    ({"lora.rank": 8, "lora.dropout": 1.5}, r"^config\.lora\.dropout=1\.5 must be in \[0, 1\)"),
    ({"lora.rank": 8, "lora.base_quantize": "int4", "lora.quantize_targets": "llm/block/.*"},
     r"^config\.lora\.quantize_targets: 'llm/block/\.\*' matches no projection"),  # named no config key
    # LoRA targets were checked only when the model was first built: a traceback after the workdir was written.
    ({"lora.rank": 8, "lora.targets": "llm/block/attn/qkv"},
     r"^config\.lora\.targets: 'llm/block/attn/qkv' matches no projection; did you mean llm/blocks/attn/qkv or "),
    ({"lora.rank": 8, "lora.targets": "llm/blocks/(attn"}, r"lora\.targets: 'llm/blocks/\(attn' is not a regular"),
    ({"lora.rank": 8, "lora.base_quantize": "nf4", "lora.quantize_targets": "["},
     r"config\.lora\.quantize_targets: '\[' is not a regular expression"),
    ({"lora.rank": 8, "lora.alpha": 0.0}, r"^config\.lora\.alpha=0\.0 must be a number > 0"),  # trained nothing
    # LoRA mistakes that trained nothing without a word (grad_norm 0 at every step), or were ignored, or named
    # fields the user never set ('LoRA rank must be >= 1', 'unknown param_dtype'), or were a ValueError traceback.
    ({"lora.rank": -4}, r"^config\.lora\.rank=-4 must be an integer >= 0 \(the LoRA rank; 0 = no LoRA"),
    ({"lora.rank": 8, "lora.alpha": float("nan")}, r"^config\.lora\.alpha=nan must be a number > 0"),
    ({"lora.rank": 8, "lora.targets": " , "}, r"^config\.lora\.targets is empty: .* would train nothing"),
    ({"lora.rank": 80}, r"^config\.lora\.rank=80 is more than llm/blocks/attn/qkv can use \(64 inputs, 192 "
                        r"outputs: A @ B has rank at most 64\)"),
    ({"lora.rank": 8, "lora.targets": "llm/.*"}, r"matches llm/lm_head, whose adapter the chunked loss "
                                                 r"\(config\.loss_chunk=512\) never calls"),
    ({"lora.rank": 8, "lora.modules_to_save": "wte,embed_tokens"},
     r"^config\.lora\.modules_to_save names embed_tokens, which it does not know; known: lm_head, wte"),
    ({"lora.modules_to_save": "wte"}, r"^config\.lora\.modules_to_save='wte' needs config\.lora\.rank > 0"),
    ({"lora.rank": 8, "lora.base_dtype": "bf16"}, r"^config\.lora\.base_dtype='bf16': unknown param_dtype"),
    ({"frozen_dtype": "int8"}, r"^config\.frozen_dtype='int8': expected ''"),
    ({"lora.rank": 8, "frozen": "visual/.*"}, r"^config\.frozen='visual/\.\*' with config\.lora\.rank=8"),
    ({"lora.rank": 8, "fix_vit": False}, r"^config\.fix_vit=False with config\.lora\.rank=8: .* add "
                                         r"'visual/blocks/\.\*' to config\.lora\.targets"),
    ({"lora.rank": 8, "lora.base_quantize": "nf4", "lora.quantize_group": 48},
     r"^config\.lora\.quantize_group=48 must be a power of two"),
    # int8 holds one scale per output channel: it demanded a power of two of a group size it never reads.
    ({"lora.rank": 8, "lora.base_quantize": "int8", "lora.quantize_group": 48},
     r"^config\.lora\.quantize_group=48 is the group size of nf4 / int4 codes: config\.lora\.base_quantize='int8' "
     r"holds one scale per output channel and ignores it \(leave config\.lora\.quantize_group at 64"),
    # The 9.6B model's mlp.c_proj has 11008 inputs, a multiple of 256 but not of 512: one scale per output channel.
    ({"model": "qwen_vl_7b", "lora.rank": 8, "lora.base_quantize": "nf4", "lora.quantize_group": 512},
     r"^config\.lora\.quantize_group=512 does not divide the 11008 inputs of llm/blocks/mlp/c_proj: .* e\.g\. 256"),
    ({"stop_at_step": 50}, r"^config\.stop_at_step=50 is past config\.total_steps=24"),
    ({"optimizer.lr": -1.0}, r"^config\.optimizer\.lr=-1\.0 must be a number > 0"),
    ({"optimizer.lr": 0.0}, r"^config\.optimizer\.lr=0\.0 must be a number > 0"),
    ({"optimizer.lr": float("nan")}, r"^config\.optimizer\.lr=nan must be a number > 0"),
    ({"optimizer.min_lr": -1e-5}, r"^config\.optimizer\.min_lr=-1e-05 must be a number >= 0"),
    ({"optimizer.min_lr": 0.1}, r"^config\.optimizer\.min_lr=0\.1 must be <= config\.optimizer\.lr=0\.003"),
    ({"optimizer.b1": 1.0}, r"^config\.optimizer\.b1=1\.0 must be in \[0, 1\)"),
    ({"optimizer.b2": -0.5}, r"^config\.optimizer\.b2=-0\.5 must be in \[0, 1\)"),
    ({"optimizer.eps": 0.0}, r"^config\.optimizer\.eps=0\.0 must be a number > 0"),
    ({"optimizer.weight_decay": -0.05}, r"^config\.optimizer\.weight_decay=-0\.05 must be a number >= 0"),
    ({"optimizer.grad_clip": -1.0}, r"^config\.optimizer\.grad_clip=-1\.0 must be a number > 0 .* or 0 for no"),
    ({"optimizer.vit_layer_decay": 1.5}, r"^config\.optimizer\.vit_layer_decay=1\.5 must be in \[0, 1\]"),
    ({"optimizer.mu_dtype": "bf16"}, r"^config\.optimizer\.mu_dtype='bf16' must be '' .* or a float dtype"),
    ({"optimizer.nu_dtype": "int8"}, r"^config\.optimizer\.nu_dtype='int8' must be '' .* or a float dtype"),
    ({"optimizer.wd_exclude": "(bias"}, r"^config\.optimizer\.wd_exclude='\(bias' is not a regex"),
])
def test_a_bad_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  with pytest.raises((errors.UserError, FileNotFoundError), match=message):
    train(small_config(2, workdir, **overrides))
  assert not workdir.exists(), sorted(os.listdir(workdir))


def _saved_model(path, config=None, quantize=None, card=True):
  """A params checkpoint at `path` with the names, shapes and dtypes (zeros: the check reads metadata only) of the
  tiny model (56 px) that `config` builds (default: the plain model), quantized by `quantize` (a QuantConfig),
  recording its preset as a merge or a conversion does (`card`; a trainer's step records none)."""
  cfg = tiny(dtype="float32").with_image_size(56)
  make = peft.model_fn(cfg, config or stage_config(3, None))
  abstract = nnx.eval_shape(make if quantize is None else lambda: qlib.quantize_model(make(), quantize))
  tree = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nnx.to_pure_dict(nnx.state(abstract)))
  orbax_store.save_params(path, tree,
                          custom_metadata={"model": {"preset": "tiny", "image_size": 56}} if card else None)


@pytest.mark.parametrize("saved, overrides, message", [
    # A LoRA run's step (base + adapters) failed in the restore: 'unexpected lora_a ...; the weights are another
    # model's: name its preset (--model / --preset)', flags of other commands, for the very same model.
    ({"config": stage_config(3, "lora=8")}, {"lora.rank": 4},
     r"^config\.init='params:.*/lora_run/checkpoints/4/params' is a LoRA run's checkpoint: .* holds its frozen base "
     r"and 8 adapter arrays \(llm\.blocks\.attn\.out\.lora_a, \.\.\.\), not a model's weights \(merge the adapters "
     r"into the base first: python -m qwenvl_jax\.convert --mode=merge_lora --src=.*/lora_run/checkpoints/4 "
     r"--dst=MERGED, then --config\.init=params:MERGED\)$"),
    ({"config": stage_config(3, "qlora=8")}, {}, r"is a LoRA run's checkpoint"),
    ({"quantize": qlib.QuantConfig("int8")}, {"lora.rank": 4}, r"is a quantized checkpoint"),
    # Another preset's weights: the hint named --model / --preset, flags of other commands.
    ({}, {"model": "small"}, r"^config\.init='params:.*': .*/params does not hold weights of config\.model='small': "
                             r"mis-shaped \(\d+\): .* \(the checkpoint records preset 'tiny': set "
                             r"config\.model=tiny\)$"),
])
def test_an_init_checkpoint_that_is_not_the_models_weights_is_refused_by_the_config_check(
    tmp_path, saved, overrides, message):
  """`check_config`, which `train` runs before it writes anything (its metadata is read, nothing restored)."""
  params = tmp_path / "lora_run" / "checkpoints" / "4" / "params"
  _saved_model(params, **saved)
  with pytest.raises(errors.ConfigError, match=message):
    validation.check_config(small_config(3, tmp_path / "run", init=f"params:{params}", **overrides))


@pytest.mark.parametrize("init", ["trainer:{run}@4", "params:{run}/checkpoints/4/params"])
def test_init_from_another_presets_run_names_the_runs_preset(tmp_path, init):
  """A run's step records no preset: the hint was the generic 'set config.model to the preset those weights are
  of'; the run's config.json beside it names it."""
  run = tmp_path / "tiny_run"
  _saved_model(run / "checkpoints" / "4" / "params", card=False)
  (run / "config.json").write_text(stage_config(3, None).to_json())
  with pytest.raises(errors.ConfigError, match=r"^config\.init='.*': .*/tiny_run/checkpoints/4/params does not hold "
                                               r"weights of config\.model='small': .* \(the run .*/tiny_run trained "
                                               r"config\.model='tiny': set config\.model=tiny\)$"):
    validation.check_config(small_config(3, tmp_path / "run", init=init.format(run=run), model="small"))


@pytest.mark.parametrize("overrides", [
    {"optimizer.grad_clip": 0.0, "optimizer.vit_layer_decay": 1.0},  # 0 = no clipping, 1 = no layer decay
    {"optimizer.grad_clip": None, "optimizer.vit_layer_decay": 0.0, "optimizer.b1": 0.0, "optimizer.lr": 1,
     "optimizer.min_lr": 0, "optimizer.weight_decay": 0.0, "optimizer.mu_dtype": "bfloat16"},
    {"optimizer.schedule": "constant", "optimizer.min_lr": 1.0},  # min_lr is the cosine's end only
])
def test_optimizer_settings_that_mean_off_are_accepted(tmp_path, overrides):
  validation.check_config(small_config(2, tmp_path / "run", **overrides))


def _config_file(tmp_path, body):
  """A config file of one's own: the stage-2 defaults plus the lines of `body` (on `c`), loaded by path."""
  path = tmp_path / "myconf.py"
  path.write_text("from qwenvl_jax.training.stage_config import stage_config\n\n\ndef get_config(arg=None):\n"
                  "  c = stage_config(2, arg)\n" + "".join(f"  {line}\n" for line in body) + "  return c\n")
  spec = importlib.util.spec_from_file_location("myconf", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module.get_config()


@pytest.mark.parametrize("body, message", [
    (["c.totl_steps = 5"], r"sets config\.totl_steps, which is not a field of a stage-2 training config; did you "
                           r"mean config\.total_steps"),
    (["c.optimizer.learning_rate = 1e-4"], r"sets config\.optimizer\.learning_rate, .*did you mean "
                                           r"config\.optimizer\.lr\?"),
    (["c.data.mixture.ocrr = 1.0"], r"sets config\.data\.mixture\.ocrr, .*did you mean config\.data\.mixture\.ocr"),
])
def test_a_misspelt_field_in_a_config_file_is_refused_naming_the_file(tmp_path, body, message):
  """The same typo as a --config. override was caught; in a config file it was recorded in config.json and
  ignored."""
  path, config = _config_file(tmp_path, body)
  with pytest.raises(errors.ConfigError, match=rf"^{path} {message}"):
    validation.check_is_training_config(config, source=str(path))
  config.workdir = str(tmp_path / "run")
  with pytest.raises(errors.ConfigError, match=message):
    train(config)
  assert not (tmp_path / "run").exists()


def test_lora_on_stage_1_with_the_default_targets_is_refused_naming_visual_ones(tmp_path):
  """Stage 1 trains the ViT and adapter and freezes the LLM; `lora=8` adapted the LLM and trained nothing else."""
  with pytest.raises(errors.ConfigError, match=r"^config\.lora\.rank=8 on stage 1 adapts the default "
                                               r"config\.lora\.targets \(the LLM's .*\), which stage 1 freezes: .*"
                                               r"--config\.lora\.targets='visual/blocks/\.\*,adapter/\.\*'"):
    validation.check_step_fields(small_config(1, tmp_path / "run", **{"lora.rank": 8}), "cpu")


@pytest.mark.parametrize("stage, targets", [
    (1, "visual/blocks/.*,adapter/.*"),  # what the refusal above suggests
    (1, "llm/blocks/attn/qkv"),  # LLM adapters written out: the user's choice
    (2, None),  # stage 2 trains the LLM (tests/training/test_peft.py runs it)
    (3, None),
])
def test_lora_targets_a_stage_accepts(tmp_path, stage, targets):
  overrides = {"lora.rank": 8, **({"lora.targets": targets} if targets else {})}
  validation.check_step_fields(small_config(stage, tmp_path / "run", **overrides), "cpu")


@pytest.mark.parametrize("arg", [None, "model=qwen_vl_7b,res=224", "lora=8", "qlora=16,fix_vit=false"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_config_and_a_mixture_of_known_tasks_pass_the_field_check(tmp_path, stage, arg):
  validation.check_is_training_config(load_stage_config(stage, arg))
  _, config = _config_file(tmp_path, ["c.data.mixture.chat = 1.0", "c.data.mixture_sources.chat = 'synthetic'"])
  validation.check_is_training_config(config)


def test_an_evaluation_config_is_refused_by_name():
  """train --config=configs/eval/flickr.py failed with AttributeError: "'stage'"."""
  from qwenvl_jax.evaluation.config import default_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.ConfigError, match=r"^configs/eval/flickr\.py is an evaluation config; train takes a "
                                               r"training config such as configs/stage2\.py$"):
    validation.check_is_training_config(default_config("flickr", None), source="configs/eval/flickr.py")
  with pytest.raises(errors.ConfigError, match=r"^the config is not a training config \(it has no stage field\)"):
    train(ml_collections.ConfigDict({"model": "tiny"}))


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "file").write_text("mine")
  for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
    with pytest.raises(errors.UserFileExistsError, match=f"{tmp_path / 'file'}.*file"):
      train(small_config(2, workdir))
  assert (tmp_path / "file").read_text() == "mine"


def _caption_key_jsonl(path):
  """A JSONL file of the wrong schema for an image-text source: `caption` where `text` is expected."""
  path.write_text("".join(json.dumps({"image": "a.png", "caption": f"shape {i}"}) + "\n" for i in range(6)))
  return path


@pytest.mark.parametrize("existing", [None, "notes.txt"])
def test_a_start_that_fails_on_its_data_leaves_nothing_that_blocks_the_corrected_command(tmp_path, existing):
  """Every record lacks `text`: the error is one line naming the source and the first bad record's reason, and the
  workdir is as it was before (no config.json that would refuse the corrected command, no empty checkpoints/)."""
  data = _caption_key_jsonl(tmp_path / "pairs.jsonl")
  workdir = tmp_path / "run"
  if existing:
    workdir.mkdir()
    (workdir / existing).write_text("mine")
  config = small_config(1, workdir, **{"data.source": f"jsonl:{data}", "data.max_consecutive_skips": 4,
                                       "total_steps": 2})
  with pytest.raises(errors.InputFormatError, match=rf"^data source jsonl:{data}: 5 bad records in a row, the "
                                                    rf"first bad record '{data}:1': neither 'conversations' nor"):
    train(config)
  if existing:
    assert sorted(os.listdir(workdir)) == [existing] and (workdir / existing).read_text() == "mine"
  else:
    assert not workdir.exists(), sorted(os.listdir(workdir))


def test_a_failed_start_keeps_a_workdir_that_holds_a_checkpoint(tmp_path):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "config.json").write_text("{}")
  workdir_lib.remove_new(str(tmp_path), before=frozenset())
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]
  (tmp_path / "checkpoints" / "4").rmdir()
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is no checkpoint
  workdir_lib.remove_new(str(tmp_path), before=frozenset({"config.json"}))
  assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_a_failed_start_removes_only_what_the_trainer_writes(tmp_path):
  """What appeared meanwhile and is not the trainer's (another job's run in a folder named as the workdir by
  mistake, a profile of the steps before the crash) is kept."""
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "tensorboard").mkdir()
  (tmp_path / "metrics.jsonl").write_text("")
  (tmp_path / "runB" / "checkpoints" / "7").mkdir(parents=True)
  (tmp_path / "profile").mkdir()
  workdir_lib.remove_new(str(tmp_path), before=None)
  assert sorted(os.listdir(tmp_path)) == ["profile", "runB"]


def test_a_run_that_logged_a_step_keeps_its_workdir(tmp_path):
  """A non-finite loss or Ctrl-C before the first checkpoint is no failed start: its metrics are the record."""
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 6.9}\n')
  workdir_lib.remove_new(str(tmp_path), before=None)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.jsonl"]
  (tmp_path / "metrics.jsonl").write_text("")  # created, nothing logged yet: a failed start
  workdir_lib.remove_new(str(tmp_path), before=None)
  assert not tmp_path.exists()


def _steps(path):
  with open(path) as f:
    return [json.loads(line)["step"] for line in f]


def test_resumed_run_drops_the_metrics_rows_past_its_checkpoint(tmp_path):
  """A run SIGKILLed at step 6 after its step-4 checkpoint logged steps 5 and 6 (and half of step 7's row); the
  resumed run starts at 4 and logs 5, 6, ... again: each step must appear once."""
  path = tmp_path / "metrics.jsonl"
  rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7))
  path.write_text(rows + '{"step": 7, "lo')
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=8, initial_step=4, tensorboard=False,
                                 progress_bar=False)
  for s in range(5, 9):
    writer.write(s, {"loss": 2.0 / s})
  writer.close()
  assert _steps(path) == list(range(1, 9))
  with open(path) as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert losses[4] == 1.0 / 4 and losses[5] == 2.0 / 5
