"""When the asynchronous driver may start a learner step or a worker's rollout batch (DESIGN.md §7).

The Ray job's driver (jobs/train_pcl.py) keeps one learner step in flight and as many rollout
batches as it has idle workers, within three rules that `Pacing` holds, apart from Ray:

- staleness: a rollout batch starts only if its paths, collected with the published weights, will
  be at most ``max_staleness`` learner versions old when learned from (the learner's version, plus
  one for a step in flight, minus the published version);
- the buffer's own backpressure: a rollout batch starts only if the tokens no learner step has
  matched yet (the buffer's count, as last reported) plus every batch in flight, this one included,
  at ``batch_tokens`` each, still fit in ``buffer_tokens``, so that the buffer does not evict paths
  the learner has not seen;
- the learner takes at most ``steps_per_batch`` steps per rollout batch landed, and none after the
  buffer could not fill a batch until a new rollout batch lands.

With ``max_staleness`` 0 this is the synchronous loop: one rollout batch, then its learner steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pacing:
    max_staleness: int
    steps_per_batch: int
    buffer_tokens: int
    batch_tokens: int  # a rollout batch's tokens, at most (batch size × max new tokens)
    batches: int = 0  # rollout batches landed (this session)
    steps: int = 0  # learner steps taken (this session)
    starved: bool = False  # the buffer could not fill the learner's last batch
    unseen: int = 0  # the buffer's count of tokens no learner step has matched, as last reported

    def may_learn(self) -> bool:
        return not self.starved and self.steps < self.batches * self.steps_per_batch

    def may_collect(self, version: int, learning: bool, published: int, pending: int) -> bool:
        """Whether one more rollout batch may start with the ``published`` weights while the learner
        is at ``version`` (``learning``: a step in flight) and ``pending`` batches are in flight."""
        if version + learning - published > self.max_staleness:
            return False
        return self.unseen + (pending + 1) * self.batch_tokens <= self.buffer_tokens

    def collected(self, unseen: int) -> None:
        """A rollout batch landed; the buffer reported ``unseen``."""
        self.batches, self.starved, self.unseen = self.batches + 1, False, unseen

    def learned(self, unseen: int | None) -> None:
        """A learner step came back (``unseen`` from the buffer), or, with None, found too few paths
        (the buffer reset its count)."""
        if unseen is None:
            self.starved, self.unseen = True, 0
        else:
            self.steps, self.unseen = self.steps + 1, unseen

    def stalled(self) -> None:
        """Nothing in flight and nothing admitted: the reported count is out of date."""
        self.unseen, self.starved = 0, False
