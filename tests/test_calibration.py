"""Call-threshold calibration (kdtw/calibration.py) on tiny real models, the quantile helper on
hand-made scores, and call_thresholds.json round trips."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kdtw.calibration import (
    THRESHOLDS_FILE,
    calibrate_budgets,
    calibrate_thresholds,
    load_thresholds,
    measure_use,
    quantile_threshold,
    save_thresholds,
    thresholds_for,
)
from kdtw.decoding import generate

PROMPTS = [f"With light teacher use, do: w{i} w{(3 * i + 1) % 40} w{(7 * i) % 40}" for i in range(12)]
MAX_NEW = 12
TOL = 0.03  # 12 prompts × <= 12 steps: one call moves the use by ~0.007


@pytest.fixture(scope="module")
def spread(llama_close):
    """The close llama pair with a <τ> offset that puts π(<τ>) mid-range, so it varies by state."""
    teacher, student = llama_close
    student = copy.deepcopy(student)
    with torch.no_grad():
        student.tau_offset.fill_(3.0)
    return teacher, student


@pytest.mark.parametrize("rule", ["threshold", "oracle"])
def test_calibration_hits_the_targets(spread, rule):
    teacher, student = spread
    targets = [0.0, 0.1, 0.3, 0.5]
    cal = calibrate_budgets(student, teacher, [PROMPTS] * len(targets), targets, rule=rule,
                            max_new_tokens=MAX_NEW, batch_size=8)
    assert cal[0].theta == math.inf and cal[0].decodes == 0  # budget 0: never call, no decode
    for b, c in zip(targets, cal):
        assert abs(c.use - b) <= TOL, (rule, b, c)
        assert c.decodes <= 1 + 8  # the no-call decode, then at most `iters`
        # the θ returned reproduces its use (greedy decoding is deterministic)
        out = generate(student, teacher, PROMPTS, max_new_tokens=MAX_NEW, batch_size=8, call_rule=rule,
                       call_threshold=c.theta)
        assert measure_use(out) == pytest.approx(c.use)
    thetas = [c.theta for c in cal]
    assert thetas == sorted(thetas, reverse=True)  # more use, lower threshold
    assert calibrate_thresholds(student, teacher, [PROMPTS] * len(targets), targets, rule=rule,
                                max_new_tokens=MAX_NEW, batch_size=8) == thetas


def test_budget_zero_never_calls_and_one_always(spread):
    teacher, student = spread
    zero, one = calibrate_thresholds(student, teacher, [PROMPTS, PROMPTS], [0.0, 1.0], rule="threshold",
                                     max_new_tokens=MAX_NEW, batch_size=8)
    assert zero == math.inf and one == 0.0
    for rule in ("threshold", "oracle"):
        out = generate(student, teacher, PROMPTS, max_new_tokens=MAX_NEW, call_rule=rule, call_threshold=zero)
        assert not any(any(m) for m in out.call_mask)
        out = generate(student, teacher, PROMPTS, max_new_tokens=MAX_NEW, call_rule=rule, call_threshold=one)
        assert all(all(m) for m in out.call_mask)


def test_token_weighted_use(spread):
    teacher, student = spread
    [c] = calibrate_budgets(student, teacher, [PROMPTS], [0.2], rule="threshold", max_new_tokens=MAX_NEW,
                            batch_size=8, use="token")
    out = generate(student, teacher, PROMPTS, max_new_tokens=MAX_NEW, call_rule="threshold", call_threshold=c.theta)
    assert c.use == pytest.approx(sum(map(sum, out.call_mask)) / sum(out.lengths))
    assert abs(c.use - 0.2) <= TOL


def test_bad_calibration_inputs(spread):
    teacher, student = spread
    kw = dict(max_new_tokens=4, batch_size=8)
    with pytest.raises(ValueError, match="argmax and sample need none"):
        calibrate_thresholds(student, teacher, [PROMPTS], [0.1], rule="sample", **kw)
    with pytest.raises(ValueError, match="outside"):
        calibrate_thresholds(student, teacher, [PROMPTS], [1.5], rule="threshold", **kw)
    with pytest.raises(ValueError, match="1 prompt lists for 2"):
        calibrate_thresholds(student, teacher, [PROMPTS], [0.1, 0.2], rule="threshold", **kw)


# ----------------------------------------------------------------------------- quantile


def test_quantile_threshold_on_hand_made_scores():
    scores = [[0.9, 0.1, 0.5, 0.3]]  # one sequence, 4 steps: each step is 0.25 of the use
    th = quantile_threshold(scores, 0.5)
    assert 0.3 < th < 0.5  # calls 0.9 and 0.5
    assert quantile_threshold(scores, 0.0) > 0.9  # calls nothing
    assert quantile_threshold(scores, 1.0) <= 0.1  # calls everything
    # ties are called together: the cuts give uses 0, 0.5 and 1 only
    assert quantile_threshold([[0.5, 0.5, 0.1, 0.1]], 0.5) == pytest.approx(math.sqrt(0.05))
    assert quantile_threshold([[0.5, 0.5, 0.1, 0.1]], 0.25) > 0.5  # 0 and 0.5 tie: the lower use
    # per-sequence weights: the short sequence's one step counts 1/2, the long one's steps 1/8 each
    seqs = [[0.9], [0.1, 0.2, 0.3, 0.4]]
    assert 0.4 < quantile_threshold(seqs, 0.5) < 0.9
    assert 0.4 < quantile_threshold(seqs, 0.2, use="token") < 0.9  # 1 of 5 steps


# ----------------------------------------------------------------------------- files


def test_thresholds_round_trip_with_inf_as_null(tmp_path):
    assert load_thresholds(tmp_path) is None
    table = {"threshold": {"no": math.inf, "light": 0.25}, "oracle": {"no": math.inf, "light": 1.5},
             "split": "validation", "n": 16}
    path = save_thresholds(tmp_path, table)
    assert path == os.path.join(tmp_path, THRESHOLDS_FILE)
    raw = json.loads(open(path).read())
    assert raw["threshold"]["no"] is None and raw["oracle"]["light"] == 1.5
    assert os.listdir(tmp_path) == [THRESHOLDS_FILE]  # no temporary file left behind
    assert load_thresholds(tmp_path) == table
    assert load_thresholds(path) == table  # the file's own path works too
    assert thresholds_for(table, "oracle", ["no", "light"]) == [math.inf, 1.5]
    assert thresholds_for(table, "oracle", ["no", "heavy"]) is None
    assert thresholds_for(None, "threshold", ["no"]) is None


def test_bad_thresholds_files(tmp_path):
    with pytest.raises(ValueError, match="give a number >= 0"):
        save_thresholds(tmp_path, {"threshold": {"light": float("nan")}})
    with pytest.raises(FileNotFoundError, match="save the student first"):
        save_thresholds(tmp_path / "missing", {"threshold": {}})
    (tmp_path / THRESHOLDS_FILE).write_text('{"threshold": {"light": "high"}}')
    with pytest.raises(ValueError, match="delete the file and calibrate again"):
        load_thresholds(tmp_path)
    (tmp_path / THRESHOLDS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_thresholds(tmp_path)


def test_calibration_imports_neither_ray_nor_mlflow():
    code = "import sys, kdtw.calibration; assert not {'ray', 'mlflow'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
