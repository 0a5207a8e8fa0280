"""Supervised pretraining of the default teacher and of the student's starting point.

Each model is trained with next-token cross-entropy on the task's train split (prompts carry a
random budget phrase, so both models read every instruction), then greedy-decoded on the
validation split for BLEU/chrF or ROUGE. Results are cached under ``<models_dir>/<role>`` as
``save_pretrained`` folders (written atomically) with ``pretrain_report.json`` beside them.

A role with ``source: init | pretrain`` is trained from a random init of its spec. A role with
a derived source (``gguf_wheel``, ``cut``, ``narrow``; kdtw/factory.py) is fine-tuned from that
source's folder when ``pretrain.<role>_steps > 0`` (the factory then loads the fine-tune) and
left alone when it is 0; its report records the source (``base``), and a cached fine-tune of
another source is redone. ``source: pretrained`` is never trained here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import Callable

import torch

from .atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir
from .config import Config
from .decoding import generate
from .examples import spread
from .factory import (
    DERIVED,
    _load_plain,
    load_splits,
    model_folder,
    prompts_for,
    random_phrases,
    source_folder,
)
from .metrics import task_metrics
from .models import LM, ModelError, _from_pretrained, encode_outputs
from .reporting import StatusPacer
from .sources import SOURCE_META

REPORT = "pretrain_report.json"


def lm_loss(lm: LM, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """Mean token cross-entropy of ``targets`` (EOS included) given ``prompts``, over V."""
    p_ids, p_mask = lm.encode_prompts(prompts)
    o_ids, o_mask = encode_outputs(lm, targets)
    logits = lm.forward(p_ids, p_mask, o_ids)[..., : lm.vocab_size].float()  # [B, T, V]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), o_ids, reduction="none")  # [B, T]
    return (nll * o_mask).sum() / o_mask.sum()


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def supervised_train(
    cfg: Config,
    lm: LM,
    *,
    steps: int,
    log: Callable[[str], None] = print,
    name: str = "model",
) -> dict:
    pc = cfg.pretrain
    splits = load_splits(cfg)
    train = splits["train"]
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    lm.model.train()
    t0 = time.perf_counter()
    ema, pace = None, StatusPacer(pc.log_every, steps)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, pc.lr, pc.warmup_steps)
        batch = rng.sample(train, min(pc.batch_size, len(train)))
        prompts = prompts_for(cfg, batch, random_phrases(cfg, len(batch), rng))
        loss = lm_loss(lm, prompts, [ex.target for ex in batch])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{name}: loss is {loss.item()} at step {step}; lower pretrain.lr (now {pc.lr})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if pace.due(step + 1):
            el = time.perf_counter() - t0
            log(f"[pretrain {name}] step {step + 1}/{steps} loss {ema:.3f} "
                f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
    lm.model.eval()
    return {"steps": steps, "final_loss": ema, "train_seconds": time.perf_counter() - t0}


def evaluate_lm(cfg: Config, lm: LM, *, split: str = "validation", n: int | None = None, phrase: str | None = None) -> dict:
    """Greedy decoding of ``lm`` alone on a split: task metrics and timing."""
    examples = spread(load_splits(cfg)[split], n or None)
    phrase = phrase or next(iter(cfg.budgets))
    out = generate(
        None,
        lm,
        prompts_for(cfg, examples, phrase),
        mode="teacher",
        max_new_tokens=cfg.decoding.max_new_tokens,
        batch_size=cfg.decoding.batch_size,
    )
    metrics = task_metrics(cfg.task.metric, out.texts, [ex.target for ex in examples])
    return {**metrics, "decode_seconds": out.wall_time, "n": len(examples)}


def _save_atomic(lm: LM, folder: str, report: dict) -> None:
    """The model, tokenizer and report to a temporary sibling folder, swapped in by
    `replace_dir`: a kill at any point leaves the old cached model or the new one."""
    tmp = make_tmp_dir(folder)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, REPORT), "w") as f:
            json.dump(report, f, indent=2)
        replace_dir(tmp, folder)
    except BaseException:
        remove_dir(tmp)
        raise


def pretrain(cfg: Config, *, roles: tuple[str, ...] = ("teacher", "student"), force: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Train (or reuse the cached) default teacher and student starting point; returns the
    report per role (parameters, steps, seconds, loss, validation metrics)."""
    reports = {}
    for role in roles:
        folder = model_folder(cfg, role)
        recover_dir(folder)  # a save killed half-way leaves the old copy aside
        cached = os.path.join(folder, REPORT)
        spec = getattr(cfg, role)
        steps = getattr(cfg.pretrain, role + "_steps")
        if spec.source in DERIVED and steps == 0:
            log(f"[pretrain {role}] pretrain.{role}_steps=0: the {spec.source} model is used as is")
            continue
        # The source a derived role is fine-tuned from (built here on first use).
        base = _base(cfg, role) if spec.source in DERIVED else None
        if os.path.exists(cached) and not force:
            with open(cached) as f:
                report = json.load(f)
            if base is None:
                _check_recipe(report.get("recipe"), _recipe(cfg, role), role, folder)
            if base is None or report.get("base") == base:
                reports[role] = report
                log(f"[pretrain {role}] cached at {folder} (use --force to retrain)")
                continue
            log(f"[pretrain {role}] {folder} was fine-tuned from another source: fine-tuning again")
        if spec.source == "pretrained":
            log(f"[pretrain {role}] {role}.source=pretrained: nothing to pretrain")
            continue
        if base is not None:
            model, tok = _from_pretrained(base["folder"], dtype=spec.dtype, device=spec.device)
            what = f"{spec.source} model (fine-tuning {base['folder']})"
        else:
            init_cfg = dataclasses.replace(cfg, **{role: dataclasses.replace(spec, source="init")})
            model, tok = _load_plain(init_cfg, role, seed_offset=1 if role == "teacher" else 2)
            what = spec.arch
        lm = LM(model, tok)
        log(f"[pretrain {role}] {what} {lm.num_parameters() / 1e6:.2f}M parameters, {steps} steps")
        before = None
        if base is not None:
            # The same validation examples before the fine-tune: what it bought.
            before = evaluate_lm(cfg, lm, n=cfg.pretrain.eval_examples)
            log(f"[pretrain {role}] validation before {_fmt(before)}")
        stats = supervised_train(cfg, lm, steps=steps, log=log, name=role)
        metrics = evaluate_lm(cfg, lm, n=cfg.pretrain.eval_examples)
        log(f"[pretrain {role}] validation {_fmt(metrics)}")
        report = {"role": role, "parameters": lm.num_parameters(), **stats, "validation": metrics}
        if base is not None:
            report["base"] = base
            report["validation_before"] = before
        else:
            report["recipe"] = _recipe(cfg, role)
        _save_atomic(lm, folder, report)
        reports[role] = report
    return reports


def _recipe(cfg: Config, role: str) -> dict:
    """What a model trained here from a random init is made of: its spec (not where it runs),
    the task (its words are the tokenizer's) and prompts. Not the run's seed: the cached models
    are the shared starting point of runs of every seed (`seed=N` on a later command)."""
    spec = {f"{role}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, role)).items()
            if k not in ("source", "device", "dtype")}
    task = {f"task.{k}": v for k, v in dataclasses.asdict(cfg.task).items()}
    recipe = {**spec, **task, "budgets": sorted(cfg.budgets), "prompt_template": cfg.prompt_template}
    return json.loads(json.dumps(recipe))  # as the report keeps it (tuples as lists)


def _check_recipe(saved: dict | None, now: dict, role: str, folder: str) -> None:
    """Refuse a cached model made from another recipe (a report written before recipes were
    recorded is taken as it is)."""
    if saved is None:
        return
    diff = [k for k in now if saved.get(k) != now[k]] + [k for k in saved if k not in now]
    if diff:
        k = diff[0]
        raise ModelError(f"the cached {role} in {folder} was pretrained with {k}={saved.get(k)!r}, the config "
                         f"now gives {now.get(k)!r}{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}: add "
                         "--force to pretrain it again, or give another models_dir")


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def _base(cfg: Config, role: str) -> dict:
    """The folder of a derived source and its recipe (``kdtw_source.json``), as recorded in the
    report of its fine-tune."""
    folder = source_folder(cfg, role)
    with open(os.path.join(folder, SOURCE_META)) as f:
        recipe = json.load(f)
    return {"source": getattr(cfg, role).source, "folder": os.path.abspath(folder), "recipe": recipe}

