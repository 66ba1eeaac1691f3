"""The inference planner AOT-compiles the real decode step and prefill for a TPU chip (tiny model, in a child
process with libtpu): int8 weights and an int8 cache show up as fewer argument bytes."""
import json
import subprocess
import sys

import pytest

from tests.planning.conftest import requires_libtpu, run_json
from tests.training import helpers


def _plan(quantize, kv_cache_dtype, with_prefill) -> dict:
  # One child per plan: libtpu (0.0.42.1) crashed compiling a third program in one process. 112 px, not 56: the
  # int8 prefill at 56 px (a 4 x 4 patch grid) crashes libtpu 0.0.42.1 itself (SIGSEGV in its convolution cost
  # model); 112 px and 224 px compile.
  return run_json(f"""
      import json
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.model import get_preset
      from qwenvl_jax.planning import inference_plan
      cfg = get_preset("tiny", dtype="bfloat16", param_dtype="bfloat16", remat_policy="none").with_image_size(112)
      plan = inference_plan.plan_inference(cfg, chips.parse_topology("v5e-1", 1), quantize={quantize!r}, batch=4,
                                           context=512, prompt=64, kv_cache_dtype={kv_cache_dtype!r},
                                           with_prefill={with_prefill!r})
      print(json.dumps({{"args": plan.decode.argument_bytes, "weights": plan.weight_bytes,
                        "cache": plan.cache_bytes, "fits": plan.decode.fits,
                        "prefill": plan.prefill is not None and plan.prefill.fits, "report": plan.format()}}))
  """)


@requires_libtpu
def test_int8_weights_and_cache_shrink_the_compiled_decode_arguments():
  # (int8 weights, int8 cache, prefill) in one program made libtpu 0.0.42.1 crash in a child process (not from
  # the command line): the prefill is planned with the bf16 cache, the int8 cache with the decode step.
  bf16, int8, int8kv = _plan(None, None, False), _plan("int8", None, True), _plan("int8", "int8", False)
  assert "int8" in int8["weights"] and "int8" not in bf16["weights"]
  # The decode step's arguments are the weights and the cache: int8 weights take half the bf16 bytes.
  shrink = bf16["args"] - int8["args"]
  assert shrink > 0.4 * sum(bf16["weights"].values())
  assert int8kv["cache"] < 0.6 * int8["cache"] and int8kv["args"] < int8["args"]
  assert int8kv["fits"] and int8["prefill"] and "FITS" in int8["report"]


@requires_libtpu
def test_server_plan_on_the_tensor_parallel_layout_splits_weights_and_cache_over_the_host():
  # v5e-8 is one host: tiny allows tensor 2 (its 2-head ViT), so 4 replicas; each chip holds half the weights and
  # an eighth of the slots' cache (rows over the replicas, heads over tensor).
  out = run_json("""
      import json
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.model import get_preset
      from qwenvl_jax.planning import inference_plan
      cfg = get_preset("tiny", dtype="bfloat16", param_dtype="bfloat16", remat_policy="none").with_image_size(56)
      plan = inference_plan.plan_inference(cfg, chips.parse_topology("v5e-8", 1), quantize=None, batch=64,
                                           context=1024, prompt=64, rules_name="inference_tp", server=True)
      print(json.dumps({"mesh": plan.facts["mesh"], "args": plan.decode.argument_bytes,
                        "prefill_args": plan.prefill.argument_bytes, "weights": sum(plan.weight_bytes.values()),
                        "cache": plan.cache_bytes, "decode_temps": plan.decode.temp_bytes,
                        "encode_args": plan.encode.argument_bytes, "peak": plan.peak_bytes(),
                        "copy_temps": plan.copy.temp_bytes, "copy_aliased": plan.copy.alias_bytes,
                        "report": plan.format()}))
  """)
  assert out["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  per_chip = out["weights"] / 2 + out["cache"] / 8
  assert 0.8 * per_chip < out["args"] < 1.2 * per_chip, out["report"]
  # The engine's prefill holds the whole slots' cache too (donated), not a prefill-sized one.
  assert out["prefill_args"] > out["cache"] / 8
  # serve's defaults: prefills of up to 4 requests, each with up to 4 images (16 encoded at once).
  assert "server prefill (4 request(s) into the 64 slots' cache)" in out["report"] and "FITS" in out["report"]
  assert "server image encoding (16 image(s);" in out["report"]
  # The engine's own decode call (inference.slot_programs) updates the cache in place. Its temporaries hold one
  # layer's attended keys and values and the sampling's [rows, vocabulary] buffers (logits, penalties,
  # log-probabilities: 2.1 MiB here, which does not grow with the context), never a copy of K or V whole (half the
  # cache or more; Generator's one-step program, compiled here before, held one). A 1024-slot context keeps the
  # two apart: at 512 slots half the cache per chip was 2.0 MiB.
  assert out["decode_temps"] < 0.5 * out["cache"] / 8, out["report"]
  # Every weight is resident in every program (the ViT's too, which decoding never reads), and the encoding
  # program runs with the slots' cache resident.
  assert out["encode_args"] >= out["weights"] / 2 * 0.99
  assert out["peak"] >= out["encode_args"] + out["cache"] / 8 and "server image encoding" in out["report"]
  # The copy of one row's prompt onto another (an API request's n choices) updates the donated cache in place
  # and holds less than one layer of the row in flight (a row's share per chip: its heads over tensor 2; tiny's 4
  # layers). Sliced at a traced row of the split row axis by XLA's partitioner, it all-gathered the whole cache.
  cfg_layers = 4
  assert out["copy_aliased"] >= 0.99 * out["cache"] / 8, out["report"]
  assert out["copy_temps"] < out["cache"] / 64 / 2 / cfg_layers, out["report"]
  assert "server prompt copy" in out["report"] and "peak of the four programs" in out["report"]


def test_the_module_command_reports_a_user_mistake_in_one_line():
  """`python -m qwenvl_jax.planning.inference_plan` (README's slot-planning command) ended an unknown chip or a
  missing libtpu in a traceback, status 1, where `plan` prints one line, status 2. With --json (which it lacked)
  stdout stays empty: a script reads no half object."""
  proc = subprocess.run([sys.executable, "-m", "qwenvl_jax.planning.inference_plan", "--preset=tiny",
                         "--topology=v9z-8", "--json"], capture_output=True, text=True, timeout=300,
                        cwd=helpers.REPO, env=helpers.subprocess_env(devices=1), check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.startswith("error: unknown chip 'v9z'") and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stdout == ""


@pytest.mark.parametrize("flags, message", [
    (["--prompt=4096"], "error: --prompt=4096 is longer than context=2048"),
    (["--batch=0", "--max_slots"], "error: --batch=0 must be positive"),
    (["--images=-1"], "error: --images=-1 must be >= 0"),
])
def test_the_module_command_refuses_sizes_no_plan_has_in_one_line(flags, message):
  """They were tracebacks (plan_inference's ValueError, a ZeroDivisionError in the cache sharding, a negative
  shape), after libtpu had started."""
  proc = subprocess.run([sys.executable, "-m", "qwenvl_jax.planning.inference_plan", "--preset=tiny",
                         "--topology=v5e-4", *flags], capture_output=True, text=True, timeout=300, cwd=helpers.REPO,
                        env=helpers.subprocess_env(devices=1), check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip() == message, proc.stderr[-2000:]


def test_a_server_plan_refuses_slots_serve_refuses(monkeypatch):
  """`inference_plan --server --batch=3` said it fits where `serve --num_slots=3` refuses to start: tiny on 4 chips
  of one host is tensor 2 x 2 replicas. Both call `layout.check_slots`; the refusal comes before any compile (4 of
  the test's fake CPU devices stand in for the topology's, which need libtpu)."""
  import jax  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import inference_plan, mesh  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(mesh, "topology_devices", lambda topology: jax.devices()[:topology.num_chips])
  cfg = inference_plan.inference_model_config("tiny", 56)
  with pytest.raises(errors.ConfigError, match=r"^--batch=3 does not split over the 2 model replicas of the mesh "
                                               r"\(data 2 x tensor 2\)"):
    inference_plan.plan_inference(cfg, chips.parse_topology("v5e-4"), quantize=None, batch=3, context=64,
                                  prompt=16, rules_name="inference_tp", server=True)


def test_an_inference_plan_as_json_holds_each_program_and_the_peak():
  import json  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import aot, inference_plan  # pylint: disable=import-outside-toplevel
  gib = chips.GIB
  step = lambda temp, tokens: aot.StepPlan(chip=chips.CHIPS["v5e"], num_chips=1, argument_bytes=10 * gib,
                                           output_bytes=0, alias_bytes=0, temp_bytes=temp * gib, code_bytes=0,
                                           flops=1e9, bytes_accessed=1e9, optimal_seconds=None, tokens=tokens)
  facts = {"batch": 8, "context": 2048, "kv_cache_dtype": "bfloat16", "quantize": "int8", "server": False,
           "prefill_batch": 1, "prompt": 1024}
  result = inference_plan.InferencePlan(step(1, 8), step(7, 1024), {"int8": 9 * gib}, 2 * gib, facts)
  out = json.loads(json.dumps(result.to_dict()))
  assert out["decode"]["tokens_per_step"] == 8 and out["prefill"]["memory_bytes"]["temporaries"] == 7 * gib
  assert out["decode"]["tokens_per_second"]["estimate"] == pytest.approx(8 / (1e9 / chips.CHIPS["v5e"].hbm_bytes_per_s))
  assert out["encode"] is None and out["peak_bytes_per_chip"] == 17 * gib and out["fits"] is False
  assert out["what_would_fit"] == "the prefill of one 1024-token prompt does not fit: a shorter prompt"
  assert out["facts"] == facts


def test_what_would_fit_names_the_server_program_that_does_not_and_its_own_sizes():
  """The full-size int8 server on v5e-1 with serve's defaults: the decode call fits (14.6 GiB), the prefill of 4
  requests does not (19.2 GiB of temporaries; 1 request fits). The plan said "at most ~8 rows with this cache" (8
  slots were planned) under training advice ("remat more (--config.remat=full ...)") for the prefill."""
  from qwenvl_jax.hardware import chips  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import aot, inference_plan  # pylint: disable=import-outside-toplevel
  gib = chips.GIB
  facts = {"batch": 8, "context": 2048, "kv_cache_dtype": "int8", "quantize": "int8", "server": True,
           "prefill_batch": 4, "prompt": 2048, "images": 4}
  remedy = inference_plan._remedy  # pylint: disable=protected-access
  step = lambda args, temp, program, facts=facts: remedy(aot.StepPlan(
      chip=chips.CHIPS["v5e"], num_chips=1, argument_bytes=int(args * gib), output_bytes=0, alias_bytes=0,
      temp_bytes=int(temp * gib), code_bytes=0, flops=None, bytes_accessed=None, optimal_seconds=None), program,
      facts)
  plan = inference_plan.InferencePlan(step(13.09, 1.51, "server_decode"), step(13.12, 19.23, "server_prefill"),
                                      {"int8": 9 * gib}, int(4.06 * gib), facts, step(9.03, 1.26, "encode"))
  assert not plan.fits()
  assert plan.what_would_fit() == ("the prefill of 4 requests at once does not fit: plan it with prefill_batch=1 "
                                   "(serve's --prefill_batch; its temporaries need not shrink in proportion)")
  advice = plan.prefill.advice()
  assert advice[0] == f"temporaries take 19.2 GiB per chip: {inference_plan.REMEDIES['server_prefill']}", advice
  assert not any("remat" in tip or "train state" in tip for tip in advice), advice
  # Weights and cache alone over the budget: the levers the plan does not use yet, in its command's words.
  advice = step(15.5, 0.2, "server_decode").advice()
  assert advice[0] == ("weights, KV cache and inputs alone take 15.5 GiB per chip: int4 weights (--quantize=int4), "
                       "fewer slots (serve's --num_slots) or a shorter context (--context), or more chips (tensor "
                       "parallelism)"), advice
  generate = {**facts, "server": False, "quantize": "none", "kv_cache_dtype": "bfloat16"}
  advice = step(15.5, 0.2, "decode", generate).advice()
  assert advice[0] == ("weights, KV cache and inputs alone take 15.5 GiB per chip: int8 or int4 weights "
                       "(--quantize), an int8 KV cache (--kv_cache_dtype=int8), fewer rows (the plan's batch; "
                       "evaluate's --config.per_device_batch_size) or a shorter context (the prompt and "
                       "--max_new_tokens), or more chips (tensor parallelism)"), advice
  # One request of the whole context does not fit either: a shorter context, serve's flag named.
  one = inference_plan.InferencePlan(plan.decode, plan.prefill, plan.weight_bytes, plan.cache_bytes,
                                     {**facts, "prefill_batch": 1}, plan.encode)
  assert one.what_would_fit().startswith("the prefill of one 2048-token prompt does not fit: a shorter context "
                                         "(serve's --context")
  # generate and evaluate (not a server) prefill all rows at once: no prefill_batch flag to name.
  rows = inference_plan.InferencePlan(plan.decode, plan.prefill, plan.weight_bytes, plan.cache_bytes,
                                      {**facts, "server": False})
  assert rows.what_would_fit() == "the prefill of 4 rows at once does not fit: a smaller batch or a shorter prompt"
  # The decode call over HBM: the slots that fit, as before.
  slots = inference_plan.InferencePlan(step(13.09, 4.0, "server_decode"), None, plan.weight_bytes, plan.cache_bytes,
                                       facts)
  assert slots.what_would_fit().startswith("at most ~") and " slots with this cache" in slots.what_would_fit()


def test_the_inference_plan_takes_the_presets_resolution_unless_told():
  """`plan --preset=tiny --inference=...` planned 448 px images where the counts above it (and serve) use tiny's 224."""
  from qwenvl_jax.planning import inference_plan  # pylint: disable=import-outside-toplevel
  assert inference_plan.inference_model_config("tiny").vision.image_size == 224
  assert inference_plan.inference_model_config("qwen_vl_7b").vision.image_size == 448
  assert inference_plan.inference_model_config("tiny", 56).vision.image_size == 56


def test_the_module_command_with_json_prints_one_object_and_the_report_on_stderr(monkeypatch, capsys):
  """`python -m qwenvl_jax.planning.inference_plan` had no --json (`plan` has): scripts parsed its report. Its work
  runs in-process here, 1 fake CPU device standing in for v5e-1 (whose devices need libtpu); given no sizes, the
  server plan holds serve's defaults (its prompt the whole context: serve compiles prefills up to it)."""
  import jax  # pylint: disable=import-outside-toplevel
  from qwenvl_jax import serving_defaults  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.planning import inference_plan, mesh  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(mesh, "topology_devices", lambda topology: jax.devices()[:topology.num_chips])
  returned = inference_plan.run(
      preset="tiny", res=56, topology="v5e-1", quantize=None, kv_cache_dtype=None, batch=None, context=64, prompt=None,
      images=None, prefill_batch=None, tensor_parallel=0, decode_steps=2, rules_name="inference_tp", group_size=128,
      with_prefill=False, server=True, slot_search=False, as_json=True)
  out, err = capsys.readouterr()
  report = json.loads(out)
  assert report == json.loads(json.dumps(returned)) and out.count("\n") == 1
  assert set(report) == {"model", "topology", "inference", "max_slots"} and report["max_slots"] is None
  assert report["model"] == {"name": "tiny", "image_size": 56, "llm_layers": 4}
  assert report["topology"]["name"] == "v5litepod-1" and report["topology"]["num_chips"] == 1
  facts = report["inference"]["facts"]
  assert (facts["batch"], facts["prefill_batch"], facts["images"], facts["prompt"]) == (
      serving_defaults.NUM_SLOTS, serving_defaults.PREFILL_BATCH, serving_defaults.MAX_IMAGES, 64)
  assert report["inference"]["decode"]["memory_bytes"]["arguments"] > report["inference"]["cache_bytes"]
  assert report["inference"]["prefill"] is None and report["inference"]["fits"] is True
  assert f"server: 4-layer LLM, 56 px weights none, KV cache bfloat16, slots {serving_defaults.NUM_SLOTS}" in err


_SERVER_PREFILL = """
    import dataclasses, json
    from qwenvl_jax.hardware import chips
    from qwenvl_jax.planning import inference_plan
    cfg = inference_plan.inference_model_config("qwen_vl_7b")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layers=2),
                              llm=dataclasses.replace(cfg.llm, layers=2))
    plan = inference_plan.plan_inference(cfg, chips.parse_topology("v5e-8", 1), quantize="int8", batch=8,
                                         context=2048, prompt=2048, kv_cache_dtype="int8", server=True,
                                         attention={attention!r})
    print(json.dumps({{"attention": plan.facts["attention"], "temps": plan.prefill.temp_bytes,
                      "mesh": plan.facts["mesh"], "fits": plan.fits(), "report": plan.format()}}))
"""


@requires_libtpu
def test_a_server_plan_with_splash_attention_compiles_the_kernel_under_tensor_parallelism():
  """`attention=splash` (serve's --attention=splash) AOT-compiles the engine's programs with the Pallas kernel in
  `shard_map` (the 7B model's widths, two layers of each stack, int8, on v5e-8: tensor 8), and serve's prefill of
  4 requests of 2048 tokens holds less than with xla, whose [requests, heads, P, P] float32 scores per layer are
  gone (at tiny's or mid's sizes the TPU compiler fuses xla's attention whole: no scores buffer to save)."""
  splash = run_json(_SERVER_PREFILL.format(attention="splash"))
  xla = run_json(_SERVER_PREFILL.format(attention="xla"))
  assert (splash["attention"], xla["attention"]) == ("splash", "xla")
  assert splash["mesh"] == {"data": 1, "fsdp": 1, "tensor": 8}
  assert "splash attention" in splash["report"] and splash["fits"], splash["report"]
  assert splash["temps"] < 0.8 * xla["temps"], (splash["report"], xla["report"])


@requires_libtpu
def test_splash_with_rows_that_split_over_no_axis_compiles_on_a_mesh_of_several_chips():
  """serve --rules=fsdp --attention=splash: one request per prefill does not split over the 8 chips' fsdp axis, so
  the kernel's q, k, v specs split nothing, and the kernel ran outside `shard_map`: XLA refused to compile it
  ("Mosaic kernels cannot be automatically partitioned"). It runs replicated in `shard_map` now."""
  out = run_json("""
      import json
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.planning import inference_plan
      plan = inference_plan.plan_inference(inference_plan.inference_model_config("tiny", 112),
                                           chips.parse_topology("v5e-8", 1), quantize=None, batch=8, context=256,
                                           prompt=256, server=True, rules_name="fsdp", prefill_batch=1,
                                           attention="splash")
      print(json.dumps({"layout": plan.facts["layout"], "fits": plan.fits(), "report": plan.format()}))
  """)
  assert out["layout"] == "fsdp 8" and out["fits"], out["report"]
