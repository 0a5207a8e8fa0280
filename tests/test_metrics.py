import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from kdtw import metrics

REFS = ["the cat sat on the mat", "a dog ran in the park today", "birds sing"]
HYPS = ["the cat sat on a mat", "a dog ran in a park", "birds sing loudly"]


def test_perfect_hypotheses_score_100():
    assert metrics.bleu(REFS, REFS) == pytest.approx(100.0)
    assert metrics.chrf(REFS, REFS) == pytest.approx(100.0)
    assert metrics.rouge(REFS, REFS) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    )


def test_bleu_and_chrf_match_sacrebleu():
    assert metrics.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert metrics.chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < metrics.bleu(HYPS, REFS) < 100
    assert metrics.bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)


def test_rouge_is_mean_f1_times_100():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    want = {k: 100 * np.mean([s[k].fmeasure for s in per]) for k in ("rouge1", "rouge2", "rougeL")}
    assert metrics.rouge(HYPS, REFS) == pytest.approx(want)
    # Hand value: "birds sing loudly" vs "birds sing": unigram P=2/3, R=1 -> F1=0.8.
    assert metrics.rouge(["birds sing loudly"], ["birds sing"])["rouge1"] == pytest.approx(80.0)
    assert metrics.rouge(["birds sing loudly"], ["birds sing"])["rouge2"] == pytest.approx(
        100 * 2 * (1 / 2) * 1 / (1 / 2 + 1)
    )


def test_task_metrics_and_primary_metric():
    assert set(metrics.task_metrics("toy_translation", HYPS, REFS)) == {"bleu", "chrf"}
    assert metrics.task_metrics("translation", HYPS, REFS) == metrics.task_metrics(
        "toy_translation", HYPS, REFS
    )
    assert set(metrics.task_metrics("toy_summarisation", HYPS, REFS)) == {
        "rouge1", "rouge2", "rougeL"
    }
    assert set(metrics.task_metrics("summarisation", HYPS, REFS)) == {"rouge1", "rouge2", "rougeL"}
    assert metrics.primary_metric("toy_translation") == "bleu"
    assert metrics.primary_metric("summarisation") == "rouge2"
    with pytest.raises(ValueError, match="unknown task kind"):
        metrics.task_metrics("datasets", HYPS, REFS)
    with pytest.raises(ValueError, match="unknown task kind"):
        metrics.primary_metric("qa")


@pytest.mark.parametrize("fn", [metrics.bleu, metrics.chrf, metrics.rouge])
def test_metric_errors(fn):
    with pytest.raises(ValueError, match="3 hypotheses but 2 references"):
        fn(HYPS, REFS[:2])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="not str"):
        fn([[1, 2]], ["a"])


# ----------------------------------------------------------------------------- teacher use


def test_teacher_use_fraction_hand_example():
    # Sequence 1: 4 tokens incl. EOS, 1 call -> 1/4. Sequence 2: 2 tokens incl. EOS, 2 calls -> 1.
    mask = [[False, True, False, False], [True, True]]
    assert metrics.per_sequence_teacher_use(mask) == [0.25, 1.0]
    assert metrics.teacher_use_fraction(mask) == pytest.approx(0.625)
    # Not the token-level mean (3/6 = 0.5): each sequence weighs the same.


def test_teacher_use_fraction_padded_tensor_equals_lists():
    mask = torch.tensor([[0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # [B, T]
    lengths = torch.tensor([4, 2])  # the second row's third call is padding
    assert metrics.per_sequence_teacher_use(mask, lengths) == [0.25, 1.0]
    assert metrics.teacher_use_fraction(mask, lengths) == pytest.approx(0.625)
    assert metrics.teacher_use_fraction(mask.numpy(), [4, 2]) == pytest.approx(0.625)
    assert metrics.teacher_use_fraction(mask) == pytest.approx((0.25 + 0.75) / 2)


def test_teacher_use_fraction_errors():
    with pytest.raises(ValueError, match="empty"):
        metrics.teacher_use_fraction([])
    with pytest.raises(ValueError, match="T >= 1"):
        metrics.teacher_use_fraction([[True], []])
    with pytest.raises(ValueError, match="2 call-mask rows but 1 lengths"):
        metrics.teacher_use_fraction([[True], [False]], lengths=[1])
    with pytest.raises(ValueError, match="outside"):
        metrics.teacher_use_fraction(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        metrics.teacher_use_fraction(torch.zeros(3, dtype=torch.bool))


# ----------------------------------------------------------------------------- cost model


def test_cost_model_latency():
    assert metrics.cost_model_latency(100, 10, 0.1) == pytest.approx(20.0)
    assert isinstance(metrics.cost_model_latency(100, 10, 0.1), float)
    out = metrics.cost_model_latency([100, 50], np.array([10, 0]), 0.2)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [30.0, 10.0])
    np.testing.assert_allclose(metrics.cost_model_latency(10, 2, [0.0, 0.5]), [2.0, 7.0])
    with pytest.raises(ValueError, match="c must be"):
        metrics.cost_model_latency(10, 2, -0.1)
    with pytest.raises(ValueError, match="teacher_forwards"):
        metrics.cost_model_latency(10, float("nan"), 0.1)
