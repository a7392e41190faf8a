"""The sweep's ASHA: Ray's asynchronous successive halving, with the baseline left alone."""

from __future__ import annotations

from typing import Iterable

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class ReferenceExemptASHA(ASHAScheduler):
    """ASHA that never stops the baseline's trials and never compares anything with them.

    The baseline is the leaderboard's yardstick, not a candidate: cut short, it would make
    every tokenizer look better than it is; recorded at a rung, its fast start (a linear
    model) would raise the cut-off the tokenizers must pass. Trials are told apart by their
    ``combination`` index in the trial config.
    """

    def __init__(self, *, exempt_combinations: Iterable[int], **kwargs):
        super().__init__(**kwargs)
        self._exempt = frozenset(exempt_combinations)

    def _exempt_trial(self, trial) -> bool:
        return trial.config.get("combination") in self._exempt

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._exempt_trial(trial):
            return TrialScheduler.CONTINUE  # it ends itself: max_epochs or early stopping
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self._exempt_trial(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)
