"""The defaults of a training stage's experiment config; the thin `configs/stage{1,2,3}.py` call `stage_config`.

They live in the package so an installed `qwenvl_jax` can train from any directory: a config file of one's own is
`def get_config(arg=None): return stage_config(2, arg)` plus any field changes. `get_config(arg)` takes a
comma-separated `key=value` string after the file name (parsed by `qwenvl_jax.config_args`):
  python -m qwenvl_jax.train --config=configs/stage2.py:model=qwen_vl_7b,res=448
Arg keys: model (tiny | mid | qwen_vl_7b), res (224 | 448 | any multiple of the patch size), fix_vit (stage 3),
scale (demo | paper), lora (LoRA rank; 0 = full fine-tuning), qlora (QLoRA rank: LoRA of that rank on an nf4 LLM
base; `lora.base_quantize` picks int4 / int8 instead). Every field can then be overridden with
`--config.<field>=...`.

Two scales:
* `paper` (the default for `mid` and `qwen_vl_7b`): the hyperparameters of RECIPES §3.3 / SPEC §6.1 — AdamW
  β=(0.9, 0.98), ε=1e-6, weight decay 0.05, clip 1.0, cosine with warm-up, ViT layer-wise LR decay 0.95 in
  stages 1–2, the paper's global batch, sequence length, resolution, steps and gradient accumulation.
* `demo` (the default for `tiny`): the same stage semantics (what is frozen, resolution, optimizer shape) with a
  batch, sequence, step count and a larger learning rate that make a tiny model visibly learn the synthetic data
  in a few minutes on a 2-core CPU.
"""
import ml_collections

from qwenvl_jax import config_args, distributed
from qwenvl_jax.data import default_data_config
from qwenvl_jax.model.lora import OFFICIAL_TARGETS as _LORA_TARGETS
from qwenvl_jax.training.peft import QLORA_GROUP as _QLORA_GROUP
from qwenvl_jax.training.peft import QLORA_TARGETS as _QLORA_TARGETS

# The keys of the arg string, with the defaults that give their types ('' scale: demo for tiny, else paper; None
# res: the stage's resolution).
ARG_DEFAULTS = {"model": "tiny", "res": None, "fix_vit": True, "scale": "", "lora": 0, "qlora": 0}

# Per stage, paper scale: (lr, min_lr, warmup, steps, global batch, accumulation, seq_len, res, vit_layer_decay,
# max image slots per row). Image slots: stage 1 fits one 258-token image span in 512 tokens; packed stage-2 rows
# of 2048 tokens hold up to 7 captioned images; stage-3 conversations have up to 4 pictures.
_PAPER = {
    1: dict(lr=2e-4, min_lr=1e-6, warmup=500, steps=50_000, batch=30_720, accum=6, seq_len=512, res=224,
            layer_decay=0.95, max_images=1, eps=1e-6),
    2: dict(lr=5e-5, min_lr=1e-5, warmup=400, steps=19_000, batch=4096, accum=8, seq_len=2048, res=448,
            layer_decay=0.95, max_images=7, eps=1e-6),
    3: dict(lr=1e-5, min_lr=1e-6, warmup=3000, steps=8000, batch=128, accum=8, seq_len=2048, res=448,
            layer_decay=1.0, max_images=4, eps=1e-6),
}
# Demo scale (tiny model, 16 image tokens per image): sequences hold a few examples each. At 448 px the tiny ViT's
# 1024-patch attention dominates the step, so stage 2 (ViT trained) keeps one image slot per row. Adam's eps is
# 1e-8 rather than the paper's 1e-6: the tiny model's vision-path gradients start near 1e-7, where eps=1e-6
# swallows the update (measured: with 1e-6 a tiny model trained 1000 steps on one-shape captions ignored its
# images entirely, loss unchanged when images were swapped; with 1e-8 it names colour and shape).
_DEMO = {
    1: dict(lr=3e-3, min_lr=1e-4, warmup=20, steps=200, batch=8, accum=1, seq_len=128, res=224,
            layer_decay=0.95, max_images=4, eps=1e-8),
    2: dict(lr=2e-3, min_lr=1e-4, warmup=20, steps=120, batch=8, accum=1, seq_len=128, res=448,
            layer_decay=0.95, max_images=1, eps=1e-8),
    3: dict(lr=2e-3, min_lr=1e-4, warmup=20, steps=150, batch=8, accum=1, seq_len=256, res=448,
            layer_decay=1.0, max_images=2, eps=1e-8),
}


def stage_config(stage: int, arg: str | None) -> ml_collections.ConfigDict:
  """The full experiment config of `stage` (1, 2 or 3) for the arg string of `get_config`."""
  args = {**ARG_DEFAULTS, **config_args.parse_arg(arg, ARG_DEFAULTS)}
  model = args["model"]
  scale = args["scale"] or ("demo" if model == "tiny" else "paper")
  if scale not in ("demo", "paper"):
    raise ValueError(f"config arg scale={scale!r}: expected 'demo' or 'paper'")
  if args["lora"] and args["qlora"]:
    raise ValueError(f"config args lora={args['lora']} and qlora={args['qlora']}: give one (qlora=R is LoRA of "
                     "rank R on a quantized base)")
  d = (_DEMO if scale == "demo" else _PAPER)[stage]

  c = ml_collections.ConfigDict()
  c.stage = stage
  c.model = model                 # preset of qwenvl_jax.model.config
  c.res = d["res"] if args["res"] is None else args["res"]
  # Compute dtype: bf16 like the reference; the CPU demo computes in float32 (XLA:CPU emulates bf16 matmuls,
  # which makes them slower, not faster).
  c.model_dtype = "float32" if scale == "demo" else "bfloat16"
  c.param_dtype = "float32"
  c.remat = "none" if model == "tiny" else "full"   # none | full | dots | dots_no_batch
  c.attention_impl = "xla"
  # On a CPU backend, build the model in its CPU formulations ('auto'; QwenVLConfig.with_cpu_formulations: row-wise
  # attention, 2-D matmuls, shallow stacks unrolled; same parameters and values up to float rounding); 'off' runs
  # the accelerators' program on CPU too; 'on' also elsewhere (for tests and comparisons).
  c.cpu_options = "auto"
  # Tokens per chunk of the loss (qwenvl_jax/model/losses.py): the float32 [rows, T, V] logits and their gradient
  # are never built whole; 0 = the unchunked loss over the full logits. Stage 1's rows are 512 tokens, so a
  # 512-token chunk would be the whole row, the full logits again; 128 splits them in four (full size, AOT, 24
  # micro-batches: 21.8 GiB per chip on v5p-128 unchunked, 14.6 with 512, 11.7 with 128; bench/plan_loss_memory.py).
  c.loss_chunk = 128 if stage == 1 else 512
  # Stage 3: freeze ViT + ln_post + proj like the official finetune.py (True) or only the ViT like the paper.
  c.fix_vit = args["fix_vit"]
  c.frozen = ""                   # '' = the stage's filters; 'none'; or one full-match path regex
  # '' = frozen parameters in param_dtype; 'bfloat16' = no float32 copy of what never changes (training/peft.py)
  c.frozen_dtype = ""
  c.seed = 0

  c.batch_size = d["batch"]       # global rows per step (all hosts, all micro-batches)
  c.accum_steps = d["accum"]      # micro-batches per step (scanned inside the jitted step)
  c.seq_len = d["seq_len"]
  c.max_images = d["max_images"]  # image slots per row (all computed: a fixed-shape batch)
  c.total_steps = d["steps"]      # length of the LR schedule and of the run
  c.stop_at_step = 0              # > 0: save and stop there as if preempted (the schedule keeps total_steps)
  c.log_every = 10 if scale == "demo" else 50

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = d["lr"]
  c.optimizer.min_lr = d["min_lr"]
  c.optimizer.warmup_steps = d["warmup"]
  c.optimizer.schedule = "cosine"  # cosine | constant (what the official DeepSpeed fine-tuning actually ran)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = d["eps"]
  c.optimizer.weight_decay = 0.05
  c.optimizer.wd_exclude = r".*/(bias|scale)"  # no decay on biases and norm scales
  c.optimizer.grad_clip = 1.0
  c.optimizer.vit_layer_decay = d["layer_decay"]
  c.optimizer.mu_dtype = ""        # '' = parameter dtype; bfloat16 halves the first moment
  c.optimizer.nu_dtype = ""        # '' = parameter dtype; bfloat16 halves the second moment (optimizer.py)
  c.optimizer.offload = False      # keep the AdamW state in host memory (pinned_host), on device only in the step

  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.mesh.dcn = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  c.mesh.rules = "fsdp"            # fsdp | fsdp_tp (qwenvl_jax/sharding_rules.py)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50 if scale == "demo" else 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.workdir = ""                   # '' = ./runs/stage<N>
  c.resume = "auto"                # auto | force | never (qwenvl_jax/training/workdir.py)
  # Parameters of a fresh run: '' = random init, 'trainer:WORKDIR[@STEP]' = another stage's run (any
  # resolution), 'params:PATH' = a converted checkpoint (python -m qwenvl_jax.convert).
  c.init = ""
  c.tokenizer = ""                 # '' = the synthetic SentencePiece model (with an init: the init weights' own,
                                   # experiment.inherit_tokenizer), else a spec (text.load_tokenizer):
                                   # qwen:PATH, sentencepiece:PATH, or a .tiktoken / .model file
  c.synthetic_vocab_size = 1000
  c.data = default_data_config(stage)

  # LoRA (qwenvl_jax/training/peft.py): rank > 0 trains only float32 adapters on a frozen base held in base_dtype.
  # Defaults are the official finetune.py's (r 64, alpha 16, dropout 0.05 on c_attn, attn.c_proj, w1, w2).
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = args["lora"] or args["qlora"]
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  # Comma-separated full-match regexes over Einsum module paths (e.g. add 'visual/blocks/.*' for the ViT).
  c.lora.targets = ",".join(_LORA_TARGETS)
  c.lora.modules_to_save = ""      # '' or 'wte,lm_head' (LoRA on the base model, as the official code does)
  c.lora.base_dtype = "bfloat16"   # the frozen base weights: no float32 master copy
  # QLoRA: '' (LoRA on the base_dtype base) | nf4 | int4 | int8: the quantize_targets projections (regexes; default
  # every LLM block projection) held as codes + float32 scales per quantize_group inputs (64: the QLoRA paper's).
  c.lora.base_quantize = "nf4" if args["qlora"] else ""
  c.lora.quantize_group = _QLORA_GROUP  # nf4 / int4 only: int8 has one scale per output channel
  c.lora.quantize_targets = ",".join(_QLORA_TARGETS)

  c.distributed = distributed.default_config()   # multi-process start-up (qwenvl_jax/distributed.py)

  # Evaluation during training (qwenvl_jax/evaluation/during_training.py): every `eval_every` steps and at the
  # end, the eval job's code on the current parameters; scores go to metrics.jsonl and TensorBoard (eval/...).
  c.eval_every = 0                 # 0 = off
  c.eval = ml_collections.ConfigDict()
  c.eval.task = "flickr"           # a task name or its config file, configs/eval/<task>.py
  c.eval.data_path = ""            # '' = a synthetic held-out set when training on synthetic data, else the
                                   # task's official file; any file of its format or a tfds:/array_record: spec
  c.eval.annotation_path = ""      # VQA: the official annotation JSON ('' = the task's / the config file's)
  c.eval.image_root = ""
  c.eval.max_examples = 32         # the first N examples (0 = all)
  c.eval.per_device_batch_size = 4
  c.profile_steps = ""             # "a:b": a jax.profiler trace of steps a..b-1 in <workdir>/profile
  c.peak_flops_per_device = 0.0    # > 0 overrides the chip table (e.g. to report an MFU on CPU)
  c.progress_bar = True
  c.tensorboard = True
  return c
