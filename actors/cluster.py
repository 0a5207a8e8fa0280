"""What every Ray job shares: the config as a job loads it, the Ray connection (a local Ray on
loopback that never joins another cluster, or ``ray.address``, or the cluster of `ray job
submit`), signal handling (`Stopper`), and the CLI guard that turns bad input into one line and
exit status 2 (`guarded`). Used by jobs/train_pcl.py and jobs/train_bc.py, which import nothing
from each other."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Callable
from urllib.parse import urlparse

from kdtw.checkpoint import CheckpointError
from kdtw.config import Config, ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClusterError(RuntimeError):
    """Ray could not be reached or started; the message says what to do."""


class Interrupted(Exception):
    """Phase 1 or 2 stopped on a signal, after the step in flight and a checkpoint."""

    def __init__(self, signame: str, step: int, ckpt: str, run_dir: str, phase: int = 2) -> None:
        super().__init__(f"{signame} at Phase-{phase} step {step}")
        self.signame, self.step, self.ckpt, self.run_dir, self.phase = signame, step, ckpt, run_dir, phase


class Stopper:
    """SIGINT and SIGTERM for the job's main thread. Inside Phase 1's or Phase 2's loop
    (``deferring``) the first signal asks the loop to stop after the step in flight, with a
    checkpoint; a second signal, or one anywhere else (loading, validation before training),
    raises KeyboardInterrupt at once (exit 130, nothing saved beyond the last checkpoint)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.deferring = False
        self._old: dict = {}

    def install(self) -> "Stopper":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    @staticmethod
    @contextmanager
    def deferred(stopper: Stopper | None):
        """While inside, ``stopper``'s first signal is a request (None: nothing to do)."""
        if stopper is None:
            yield
            return
        stopper.deferring = True
        try:
            yield
        finally:
            stopper.deferring = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = name
            print(f"kdtw: {name}: stopping after the step in flight, with a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- setup


def load(path: str | None, overrides: list[str]) -> Config:
    if path is None:
        from kdtw.cli import DEFAULT_CONFIG

        path = DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None
    # absolute paths: Ray Train workers run in their own folder, not this one
    return load_config(path, overrides).with_absolute_paths()


# What a run's saved state is shaped by and means: overrides on --resume may not change it (a
# model may move to another device or dtype between sessions)
FIXED_ON_RESUME = ("budgets", "prompt_template", "task", "teacher", "student")
_MOVABLE = ("device", "dtype")


def resumed_config(path: str, overrides: list[str], run_dir: str | None = None) -> Config:
    """The config a run saved at ``path`` with ``overrides`` applied (and ``run_dir``, where the
    run now is), refused where they change one of `FIXED_ON_RESUME`."""
    here = [f"run_dir={run_dir}"] if run_dir else []
    saved, cfg = load_config(path, here).to_dict(), load_config(path, here + list(overrides))
    now = cfg.to_dict()
    for key in FIXED_ON_RESUME:
        a, b = saved[key], now[key]
        if key in ("teacher", "student"):
            a, b = ({k: v for k, v in d.items() if k not in _MOVABLE} for d in (a, b))
        if a != b:
            leaf = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None) if isinstance(a, dict) else None
            name, was, new = (f"{key}.{leaf}", a.get(leaf), b.get(leaf)) if leaf else (key, a, b)
            raise ConfigError(f"--resume goes on with the run's {key}: {name} was {was!r}, the override makes it "
                              f"{new!r}; drop that override, or give it to a new run (--config ... run_dir=...)")
    return cfg


def resume_point(path: str, overrides: list[str]) -> tuple[Config, tuple[str, dict] | None, str | None]:
    """What ``--resume path`` continues: (config, Phase-2 checkpoint and manifest, None), or
    (config, None, Phase-1 folder) for a run stopped in Phase 1 or before Phase 2's first
    checkpoint. The run goes on in the folder ``path`` names (a moved or copied run stays where
    it is now); every state file is checked before Ray starts (a crafted one is refused)."""
    from kdtw.checkpoint import load_state, open_checkpoint, run_folder
    from kdtw.phase1 import phase1_to_resume

    from actors.system import STATE_FILES

    phase1 = phase1_to_resume(path)
    if phase1:
        here = os.path.abspath(path)
        return resumed_config(os.path.join(here, "config.yaml"), overrides, here).with_absolute_paths(), None, phase1
    ckpt, manifest = open_checkpoint(path)
    for name in STATE_FILES:
        load_state(os.path.join(ckpt, name))
    here = run_folder(ckpt)  # None: a checkpoint kept outside a run folder goes on in the config's run_dir
    cfg = resumed_config(os.path.join(ckpt, "config.yaml"), overrides, here)
    return cfg.with_absolute_paths(), (ckpt, manifest), None


def job_start(args, prog: str) -> tuple[Config, tuple[str, dict] | None, str | None, list[str]]:
    """What jobs/train_pcl.py's arguments (``--config``, ``--phase1``, ``--resume``, ``--overwrite``,
    overrides) ask for, every input checked before Ray starts: (config, Phase-2 checkpoint and
    manifest, Phase-1 folder to go on from, the earlier run's outputs in run_dir to clear)."""
    from kdtw.cli import _check_run_dir
    from actors.tracking import check_tracking
    from kdtw.factory import check_inputs
    from kdtw.phase1 import check_phase1

    old: list[str] = []
    if args.resume:
        if args.config or args.phase1 or args.overwrite:
            raise ValueError("--resume continues a run with its own config: drop --config/--phase1/--overwrite "
                             "(key=value overrides still apply)")
        cfg, resume, resume_phase1 = resume_point(args.resume, args.overrides)
    else:
        cfg, resume, resume_phase1 = load(args.config, args.overrides), None, None
        # --phase1 <run_dir>/phase1: jobs/train_bc.py's run in this folder (its phase1/ and
        # config.yaml), which Phase 2 goes on from there
        here = args.phase1 and os.path.realpath(args.phase1) == os.path.realpath(os.path.join(cfg.run_dir, "phase1"))
        old = _check_run_dir(cfg, overwrite=args.overwrite, resume_with=prog, keep=("phase1", "config.yaml") if here else ())
    if args.phase1:
        check_phase1(args.phase1)
    check_inputs(cfg)
    check_tracking()
    return cfg, resume, resume_phase1, old


def _reachable(address: str) -> None:
    """Refuse an address nothing listens on, at once (ray.init would retry for a minute)."""
    url = urlparse(address if "://" in address else f"tcp://{address}")
    if not url.hostname or url.port is None:
        raise ClusterError(f"ray.address={address!r}: give host:port (a head's GCS port, e.g. 127.0.0.1:6379), "
                           "'auto', or leave it unset to start a local Ray")
    try:
        socket.create_connection((url.hostname, url.port), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}): start one with "
                           "`ray start --head`, fix ray.address, or leave it unset to start a local Ray") from None


def _loopback_only() -> None:
    """A local Ray that listens on 127.0.0.1 only. ``ray.init`` turns a loopback node address
    into the machine's external one (its GCS, raylet, workers and agents then listen on every
    interface); Ray's switch for a single-machine Ray (its default on macOS and Windows) makes the
    node address loopback instead. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is read when Ray is
    imported, so the constant is set too (Ray 2.60: ray._private.ray_constants)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # another Ray layout: the environment variable still reaches a fresh import
        pass


def connect(cfg: Config) -> bool:
    """Join the Ray of `ray job submit`, or ``ray.address``, or start a local one; True when a
    local Ray was started (the caller shuts it down). A local Ray is a new one on loopback
    (``address="local"``: it never joins a cluster ``ray start`` left on this machine)."""
    import ray

    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    quiet = {"logging_level": "warning", "log_to_driver": True}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # a submitted job: its runtime env ships the code
        ray.init(**quiet)
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        _loopback_only()
        # the dashboard (loopback only) also serves the state API Ray Train's clean-up relies on
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, **quiet)
        return True
    if address != "auto":
        _reachable(address)
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, **quiet)
    except ConnectionError as e:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    return False


def demand(cfg: Config, phase: int, *, beside_teachers: bool = True) -> dict[str, tuple[float, str]]:
    """Ray's logical CPUs and GPUs a phase of the job holds at once, with the keys they come from:
    Phase 1 its Ray Train ranks, beside the teacher replicas (and the learner's bundle of the
    placement group, when a role wants GPUs) that jobs/train_pcl.py starts before Phase 1
    (``beside_teachers``; jobs/train_bc.py has none); Phase 2 the teacher replicas, the learner and
    the rollout workers (the pool and the buffer ask for none)."""
    r = cfg.ray
    pg = bool(r.teacher_gpus or r.learner_gpus)  # actors/system.py _placement: the learner's bundle is held from the start
    out = {}
    for kind in ("CPU", "GPU"):
        k = kind.lower()
        teachers = ((r.num_teacher_replicas, "num_teacher_replicas", f"teacher_{k}s"),
                    *(((1, None, f"learner_{k}s"),) if pg else ()))
        roles = (((r.learner_ranks, "learner_ranks", f"learner_{k}s"), *(teachers if beside_teachers else ()))
                 if phase == 1 else
                 ((r.num_teacher_replicas, "num_teacher_replicas", f"teacher_{k}s"), (1, None, f"learner_{k}s"),
                  (r.num_rollout_workers, "num_rollout_workers", f"rollout_worker_{k}s")))
        terms = [(n * getattr(r, key), f"ray.{key}" if count is None else f"ray.{count}={n} x ray.{key}")
                 for n, count, key in roles]
        out[kind] = (sum(t for t, _ in terms), " + ".join(f"{label} = {t:g}" for t, label in terms if t))
    return out


def check_fit(cfg: Config, phases: tuple[int, ...], *, local: bool, beside_teachers: bool = True,
              log: Callable[[str], None] = print) -> None:
    """Refuse a job whose phases (`demand`) ask for more logical CPUs or GPUs than the local Ray it
    started holds (Ray would keep its actors pending, the job waiting without end). On a cluster it
    joined, where an autoscaler may add nodes, say so in one line and go on."""
    import ray

    total = ray.cluster_resources()
    for phase in phases:
        for kind, (need, terms) in demand(cfg, phase, beside_teachers=beside_teachers).items():
            have = float(total.get(kind, 0.0))
            if need <= have + 1e-9:
                continue
            what = f"Phase {phase} asks for {need:g} {kind}{'' if need == 1 else 's'} ({terms}) and this Ray has {have:g}"
            if local:
                fix = ("set ray.num_cpus higher (logical CPUs may exceed the cores) or lower those keys"
                       if kind == "CPU" else "lower those keys to 0 on a machine without GPUs, or join a cluster "
                       "with GPUs (ray.address, or `ray job submit`)")
                raise ClusterError(f"{what}: {fix}")
            log(f"[ray] {what} now: the job waits until the cluster has them (`ray status` shows what it has)")


@contextmanager
def session(cfg: Config, phases: tuple[int, ...] = (1, 2), *, beside_teachers: bool = True):
    """The job's signal handling (yields its `Stopper`) and Ray connection (`connect`), the
    resources of ``phases`` checked against Ray's (`check_fit`); a local Ray this started is shut
    down on the way out, however the job ends (no process of it is left)."""
    stopper = Stopper().install()
    started = False
    try:
        started = connect(cfg)
        check_fit(cfg, phases, local=started, beside_teachers=beside_teachers)
        yield stopper
    finally:
        stopper.restore()
        if started:
            import ray

            ray.shutdown()


def _errors() -> tuple[type[BaseException], ...]:
    from actors.tracking import TrackingError
    from kdtw.cli import errors

    return (*errors(), ClusterError, CheckpointError, TrackingError)


def remote_cause(e: BaseException) -> BaseException:
    """The error an actor or task raised, out of Ray's wrappers: a `RayTaskError`'s ``cause``, a
    Ray Train run's `WorkerGroupError` (its first failed rank's), an `ActorDiedError` from a
    constructor that raised (Ray keeps that constructor's `RayTaskError` as the error's first
    argument, not as an attribute); ``e`` itself otherwise."""
    ray_errors = sys.modules.get("ray.exceptions")  # no Ray error where Ray was never imported
    actor_error = getattr(ray_errors, "RayActorError", None)
    for _ in range(8):
        nxt = getattr(e, "cause", None)
        if not isinstance(nxt, BaseException):
            failed = getattr(e, "worker_failures", None)
            nxt = next(iter(failed.values()), None) if isinstance(failed, dict) else None
        if not isinstance(nxt, BaseException) and actor_error is not None and isinstance(e, actor_error) and e.args:
            nxt = e.args[0]
        if not isinstance(nxt, BaseException) or nxt is e:
            break
        e = nxt
    return e


def guarded(body: Callable[[], int], prog: str = "python jobs/train_pcl.py") -> int:
    """Run ``body``; bad input prints one line and returns 2 (as `kdtw` does), also where an
    actor or a Ray Train rank raised it; a stop on a signal prints how to resume (``prog
    --resume``) and returns 130."""
    try:
        return body()
    except Interrupted as e:
        print(f"kdtw: interrupted by {e.signame} at Phase-{e.phase} step {e.step}, checkpoint {e.ckpt}; continue "
              f"with: {prog} --resume {e.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("kdtw: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:
        cause = remote_cause(e)
        if not isinstance(cause, _errors()):
            raise  # a defect, not bad input: the whole traceback
        print(f"kdtw: error: {' '.join(str(cause).split())}", file=sys.stderr)
        return 2
