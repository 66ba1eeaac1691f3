"""`python -m qwenvl_jax.plan`: parameter counts of the configured model, without allocating it."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from qwenvl_jax import errors, plan
from qwenvl_jax.planning import inference_plan
from qwenvl_jax.model import qwen_vl_7b
from tests.conftest import REPO_ROOT
from tests.planning.conftest import requires_libtpu
from tests.training import helpers


def test_cli_prints_reference_counts_for_the_full_model():
  env = helpers.subprocess_env()
  out = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--config=configs/stage2.py:model=qwen_vl_7b"],
                       capture_output=True, text=True, env=env, check=True, timeout=300).stdout
  assert "9,656,935,168" in out  # total
  assert "7,721,324,544" in out  # LLM
  assert "1,842,770,688" in out and "92,839,936" in out  # ViT trunk + adapter = 1,935,610,624 visual
  assert "448 px" in out


def test_stage_trainable_counts():
  counts = plan.trainable_counts(qwen_vl_7b())
  fixed_pos_embed = 256 * 4096  # the resampler's sin-cos table, fixed in the reference (requires_grad False)
  assert counts[1] == 1_935_610_624 - fixed_pos_embed  # stage 1: ViT + adapter, LLM frozen
  assert counts[2] == 9_656_935_168 - fixed_pos_embed  # stage 2: everything else
  assert counts[3] == 7_721_324_544 + 76_054_528  # stage 3 (fix_vit): LLM + resampler incl. pos_embed


@requires_libtpu
@pytest.mark.slow
def test_cli_plans_a_tiny_stage_for_a_small_tpu_topology(tmp_path):
  (tmp_path / "xla").mkdir()  # the persistent cache, as cli.run turns it on (JAX's variable: the suite sets it)
  env = dict(helpers.subprocess_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
  out = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--config=configs/stage1.py:model=tiny",
                        "--topology=v5e:2x2"], capture_output=True, text=True, env=env, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "compiling the train step" in out.stdout
  assert "fits" in out.stdout.lower() and "mfu" in out.stdout.lower(), out.stdout[-2000:]
  # A TPU executable compiled on this host cannot be loaded back: the persistent cache stored it and every rerun
  # warned "Error reading persistent compilation cache entry ... PjRtCompiler must be constructed with a Client".
  assert not [p.name for p in (tmp_path / "xla").iterdir() if "train_step" in p.name]


def test_qlora_base_bytes_of_the_full_model():
  """QLoRA r=64 at full size: the 32 LLM blocks' projections (c_attn 4096x12288, attn.c_proj 4096x4096, w1 and w2
  4096x11008, mlp.c_proj 11008x4096: 6,476,005,376 weights) at 4 bits are 3.02 GiB; their float32 scales, one per
  64 inputs, 0.38 GiB of the float32 share."""
  from qwenvl_jax import sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training import peft  # pylint: disable=import-outside-toplevel
  from tests.training.helpers import load_stage_config  # pylint: disable=import-outside-toplevel
  config = load_stage_config(3, "model=qwen_vl_7b,qlora=64")
  cfg = plan.model_config_from(config, None, None)
  state = sharding.abstract_model(peft.model_fn(cfg, config))[1]
  text = plan.format_weight_bytes(state, peft.base_quantization(config))
  assert f"int4 {6_476_005_376 / 2 / 2**30:.2f} GiB" in text, text
  assert "QLoRA base (nf4, groups of 64)" in text
  assert f"adapters float32 {112_197_632 * 4 / 2**30:.2f} GiB" in text


def test_an_int8_qlora_base_is_said_per_channel():
  """int8 codes have one scale per output channel: the line read 'groups of 64', a size int8 never uses."""
  from qwenvl_jax import sharding  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.training import peft  # pylint: disable=import-outside-toplevel
  from tests.training.helpers import load_stage_config  # pylint: disable=import-outside-toplevel
  config = load_stage_config(3, "qlora=8")
  config.lora.base_quantize = "int8"
  state = sharding.abstract_model(peft.model_fn(plan.model_config_from(config, None, None), config))[1]
  assert "QLoRA base (int8, per channel): " in plan.format_weight_bytes(state, peft.base_quantization(config))


def _plan_cli(*args, timeout=300):
  env = helpers.subprocess_env()
  return subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", *args], capture_output=True, text=True, env=env,
                        timeout=timeout, check=False)


def test_cli_prints_the_trained_count_of_the_official_lora_config_at_full_size():
  out = _plan_cli("--config=configs/stage3.py:model=qwen_vl_7b,lora=64")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "trained by LoRA r=64              112,197,632" in out.stdout


def test_json_puts_the_figures_alone_on_stdout():
  """Scripts parsed the table; with --json stdout is one JSON object (the report goes to stderr)."""
  out = _plan_cli("--preset=tiny", "--json")
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout)
  assert report["model"]["params"] == {"visual": 44_160, "adapter": 25_216, "llm": 296_256, "total": 365_632}
  assert report["model"]["trained_by_stage"]["1"] == 68_352 and report["model"]["image_size"] == 224
  assert report["topology"] is None and report["train"] is None and report["search"] is None
  assert "total                                 365,632" in out.stderr


@pytest.mark.parametrize("arg, message", [
    ("quantize=int3", "quantize='int3'; expected none, int8 or int4"),
    ("kv_cache_dtype=fp8", "kv_cache_dtype='fp8'"),
    ("batchsize=4", "unknown config arg keys ['batchsize']"),
    ("prompt=4096,context=2048", "prompt=4096 is longer than context=2048"),
    ("batch=0", "batch=0 must be positive"),
    ("attention=cudnn", "attention='cudnn'; expected xla or splash"),
])
def test_inference_arg_refuses_bad_values(arg, message):
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    inference_plan.parse_inference_arg(arg)


def test_inference_arg_maps_to_plan_inference_keywords():
  assert inference_plan.parse_inference_arg("quantize=int4,batch=8,kv_cache_dtype=int8,decode_only=true") == {
      "quantize": "int4", "batch": 8, "context": 2048, "prompt": 1024, "images": 1, "kv_cache_dtype": "int8",
      "rules_name": "inference_tp", "group_size": 128, "with_prefill": False, "prefill_batch": None,
      "tensor_parallel": 0, "server": False, "attention": "xla"}
  assert inference_plan.parse_inference_arg("")["quantize"] == "int8"
  assert inference_plan.parse_inference_arg("quantize=none")["quantize"] is None
  assert inference_plan.parse_inference_arg("server=true,attention=splash")["attention"] == "splash"


def test_cli_inference_error_is_one_line_before_compiling():
  out = _plan_cli("--preset=tiny", "--topology=v5e-1", "--inference=quantize=int3", timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == "error: --inference: quantize='int3'; expected none, int8 or int4"
  assert "Traceback" not in out.stderr and "compiling" not in out.stdout


@requires_libtpu
@pytest.mark.slow
def test_cli_plans_quantized_inference_and_a_lora_stage_of_the_tiny_model():
  out = _plan_cli("--preset=tiny", "--res=56", "--topology=v5e-1",
                  "--inference=quantize=int8,batch=4,context=512,prompt=64,kv_cache_dtype=int8,decode_only=true",
                  timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "weights int8, KV cache int8, batch 4, context 512" in out.stdout
  assert "int8 " in out.stdout.split("weights", 2)[2].splitlines()[0]  # the weight bytes by dtype hold int8
  assert "-> FITS" in out.stdout, out.stdout[-2000:]
  out = _plan_cli("--config=configs/stage3.py:model=tiny,lora=4", "--topology=v5e-1", "--config.res=56",
                  "--config.batch_size=2", "--config.seq_len=64", timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "trained by LoRA r=4" in out.stdout and "verdict: FITS" in out.stdout, out.stdout[-2000:]


def _config_file(path):
  """`get_config()` of the config file `path` (relative to the repository), loaded by path as config_flags does."""
  spec = importlib.util.spec_from_file_location("plan_test_config", REPO_ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("preset, res, message", [
    ("qwen_vl_7b", 224, r"^--preset=qwen_vl_7b --res=224 with --config: the config names the model and its resolution "
                        r"\(use --config=configs/stage2\.py:model=qwen_vl_7b,res=224 or --config\.model=qwen_vl_7b "
                        r"--config\.res=224\)$"),
    (None, 224, r"^--res=224 with --config: .* \(use --config=configs/stage2\.py:res=224 or --config\.res=224\)$"),
])
def test_preset_and_res_beside_a_config_are_refused_not_ignored(preset, res, message):
  """They printed the config's tiny model at 448 px as if they had been applied."""
  with pytest.raises(errors.ConfigError, match=message):
    plan.check_model_flags(_config_file("configs/stage2.py"), preset, res, "configs/stage2.py")


@pytest.mark.parametrize("res", [0, -224])
def test_a_resolution_that_is_not_positive_is_refused(res):
  """--res=0 silently meant the preset's resolution."""
  with pytest.raises(errors.ConfigError, match=rf"^--res={res} must be a positive multiple of the patch size"):
    plan.check_model_flags(None, "tiny", res)
  with pytest.raises(errors.ConfigError, match=rf"^--res={res}"):
    plan.model_config_from(None, "tiny", res)
  assert plan.model_config_from(None, "tiny", 56).vision.image_size == 56


def test_an_evaluation_config_is_refused_by_name():
  with pytest.raises(errors.ConfigError, match=r"^configs/eval/flickr\.py is an evaluation config; plan takes a "
                                               r"training config such as configs/stage2\.py$"):
    plan.check_model_flags(_config_file("configs/eval/flickr.py"), None, None, "configs/eval/flickr.py:model=x")


@pytest.mark.parametrize("override, message", [
    ("accum_steps=0", "config.accum_steps=0 must be an integer >= 1"),
    ("batch_size=0", "config.batch_size=0 must be an integer >= 1"),
    ("attention_impl=cudnn", "config.attention_impl='cudnn': attention_impl='cudnn' needs an NVIDIA GPU but this "
                             "computation is for 'tpu'"),
])
def test_plan_refuses_what_train_would_for_the_topologys_platform(override, message):
  """They were a ZeroDivisionError, flops.py's ValueError and the kernel check's ValueError, as tracebacks."""
  from qwenvl_jax.training import validation  # pylint: disable=import-outside-toplevel
  from tests.training.helpers import load_stage_config  # pylint: disable=import-outside-toplevel
  config = load_stage_config(1, "model=tiny")
  key, value = override.split("=")
  config[key] = int(value) if value.isdigit() else value
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    validation.check_step_fields(config, "tpu")


def test_cli_refuses_a_bad_config_value_in_one_line_before_compiling():
  out = _plan_cli("--config=configs/stage1.py:model=tiny", "--topology=v5e-4", "--config.accum_steps=0",
                  timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == "error: config.accum_steps=0 must be an integer >= 1"
  assert "Traceback" not in out.stderr and "compiling" not in out.stdout


def test_the_nearest_valid_plans_reproduce_when_passed_back(capsys):
  """With --config.mesh.ici.data=2 the suggested flags (fsdp x tensor = the slice's chips) kept data=2 and asked
  for twice the chips: passed back to plan they were make_mesh's error."""
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from tests.training.helpers import load_stage_config  # pylint: disable=import-outside-toplevel
  topology = chips.parse_topology("v5e-16")
  config = load_stage_config(1, "model=tiny")
  config.mesh.ici.data = 2
  assert not plan._batch_splits(config, topology)  # pylint: disable=protected-access
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  --config.")]
  assert len(lines) >= 3
  for line in lines:
    suggested = load_stage_config(1, "model=tiny")
    suggested.mesh.ici.data = 2
    for flag in line.split("   (")[0].split():
      path, value = flag.removeprefix("--config.").split("=")
      *groups, key = path.split(".")
      node = suggested
      for group in groups:
        node = node[group]
      node[key] = int(value) if value.lstrip("-").isdigit() else value
    assert suggested.mesh.ici.data * suggested.mesh.ici.fsdp * suggested.mesh.ici.tensor == 16, line
    assert plan._batch_splits(suggested, topology), line  # pylint: disable=protected-access


@pytest.mark.parametrize("given, kwargs, message", [
    ({"num_slices": "--num_slices=2"}, {}, "--num_slices=2 applies to --topology, which is not given: it would be "
                                           "ignored\n  hint: add --topology=v5p-128, or drop --num_slices=2"),
    ({"search_remat": "--search_remat=full"}, {"topology": "v5e-4"},
     "--search_remat=full applies to --search, which is not given"),
    ({"max_compiles": "--max_compiles=8"}, {"topology": "v5e-4"}, "--max_compiles=8 applies to --search"),
    ({"search": "--search"}, {"search": True}, "--search ranks layouts for a TPU slice: give --topology"),
    ({"search": "--search"}, {"search": True, "topology": "v5e-1", "inference": True},
     "--search ranks training layouts: drop it with --inference"),
    ({"search_tensor": "--search_tensor=2"}, {"search": False, "topology": "v5e-1", "inference": True},
     "--search_tensor=2 belongs to --search, which ranks training layouts: drop it with --inference"),
    ({}, {"topology": "v5e-4", "num_slices": 0}, "--num_slices=0 must be >= 1"),
])
def test_a_flag_the_run_would_ignore_is_refused(given, kwargs, message):
  """`plan --num_slices=2` without --topology (and the search's flags without --search) printed the plain counts
  as if the flag had been taken."""
  kwargs = {"topology": None, "search": False, "num_slices": 1, **kwargs}
  with pytest.raises(errors.ConfigError) as e:
    plan.check_flag_combination(given, **kwargs)
  assert errors.format_user_error(e.value).startswith("error: " + message)


def test_the_flags_a_run_uses_pass():
  plan.check_flag_combination({}, topology=None, search=False, num_slices=1)
  plan.check_flag_combination({"search": "--nosearch"}, topology=None, search=False, num_slices=1)
  given = {"num_slices": "--num_slices=2", "search": "--search", "max_compiles": "--max_compiles=2"}
  plan.check_flag_combination(given, topology="v5p-128", search=True, num_slices=2)


def test_a_server_plans_slot_error_names_the_keys_of_inference(monkeypatch):
  """`--inference=server=true,batch=3` on 2 model replicas hinted 'or a larger --inference: tensor_parallel'. The
  refusal comes before any compile (4 fake CPU devices stand in for the topology's, which need libtpu)."""
  import jax  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import mesh  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(mesh, "topology_devices", lambda topology: jax.devices()[:topology.num_chips])
  kwargs = inference_plan.parse_inference_arg("server=true,batch=3,context=64,prompt=16,quantize=none")
  with pytest.raises(errors.ConfigError) as e:
    inference_plan.plan_inference(inference_plan.inference_model_config("tiny", 56), chips.parse_topology("v5e-4"),
                                  **plan.INFERENCE_KEY_NAMES, **kwargs)
  assert errors.format_user_error(e.value) == (
      "error: --inference: batch=3 does not split over the 2 model replicas of the mesh (data 2 x tensor 2)\n"
      "  hint: use a multiple of 2, or a larger tensor_parallel in --inference (fewer replicas)")
