"""The annotation training loop: one epoch per ``step()``, early stopping, best-weights test.

``AnnotationTrainer`` is a plain library object. ``tokbench train`` calls ``fit()``; the
Ray Tune trainable calls ``step()`` once per training iteration and ``save_checkpoint`` /
``load_checkpoint`` when Tune asks. Nothing here knows about Ray, MLflow or progress bars.

Reproducibility: the order of training cells in epoch ``e`` and the dropout masks of that
epoch are pure functions of ``(trainer.seed, e)``, and the tokenizer's random choices are
pure functions of ``(tokenizer seed, e, cell)``. A run resumed from the checkpoint written
after epoch ``k`` therefore trains epochs ``k+1..`` exactly as the uninterrupted run did
(same device and thread count).
"""

from __future__ import annotations

import math
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader

from tokbench.data.prepared import PreparedData
from tokbench.errors import TokbenchError
from tokbench.fileio import atomic_path
from tokbench.model.config import ModelConfig, validate_model_config
from tokbench.model.transformer import CellClassifier
from tokbench.tokenizers.base import CellSentences, Tokenizer
from tokbench.training.config import (
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    resolve_amp,
    resolve_device,
    validate_optimizer_config,
    validate_scheduler_config,
    validate_trainer_config,
)
from tokbench.training.metrics import AnnotationMetrics

CHECKPOINT_FILE = "trainer.pt"
CHECKPOINT_FORMAT = 1

# Independent random streams derived from (seed, epoch, stream).
_SHUFFLE_STREAM, _DROPOUT_STREAM = 1, 2

# Validation and test cells are tokenised as in epoch 0 every time, so a stochastic
# tokenizer (random order, sampling) scores every epoch on the same sentences.
EVAL_EPOCH = 0

BatchCallback = Callable[[int, int, float], None]

# Name prefix of the thread that tokenises the next batch (``trainer.prefetch``).
PREFETCH_THREAD = "tokbench-prefetch"

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


# ----------------------------------------------------------------------------------------
# Pieces shared with the logistic-regression baseline


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def epoch_batches(cells: np.ndarray, batch_size: int, seed: int, epoch: int,
                  lengths: Optional[np.ndarray] = None, bucket_batches: int = 50) -> list[np.ndarray]:
    """Split the training cells into the batches of one epoch (row indices, int64).

    The cells are shuffled by a generator seeded from (seed, epoch) only. With ``lengths``
    (one per row of the dataset, e.g. expressed genes per cell) each chunk of
    ``bucket_batches * batch_size`` shuffled cells is sorted by length before being cut
    into batches, and the batch order is shuffled again, so batches hold cells of similar
    length without the epoch running from short to long.
    """
    rng = np.random.default_rng(stream_seed(seed, epoch, _SHUFFLE_STREAM))
    order = rng.permutation(np.asarray(cells, dtype=np.int64))
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = bucket_batches * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class EarlyStopping:
    """Tracks the best validation value of the tracked metric (higher is better) and the patience.

    ``update`` returns True when the epoch is the new best: the first epoch always is; later
    ones must beat the best by more than ``min_delta``. ``should_stop`` becomes True once
    ``patience`` epochs in a row have not improved and at least ``min_epochs`` epochs are
    done (only when ``enabled``): before learning starts the metric is flat (a model that
    predicts one class scores MCC 0 epoch after epoch), which is no reason to stop.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, enabled: bool = True, min_epochs: int = 1):
        self.patience, self.min_delta, self.enabled, self.min_epochs = patience, min_delta, enabled, min_epochs
        self.best_value = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.last_epoch = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record the metric's ``value`` for ``epoch`` (1-based); True if it is the new best."""
        self.last_epoch = epoch
        score = value if value == value else -math.inf  # NaN never counts as an improvement
        if self.best_epoch == 0 or score > self.best_value + self.min_delta:
            self.best_value, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` epochs in a row brought no improvement, from ``min_epochs`` on."""
        return self.enabled and self.last_epoch >= self.min_epochs and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        """Best value, best epoch, the count of epochs without improvement, the last epoch."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        # Checkpoints written before min_epochs existed: the last epoch follows from the others.
        self.last_epoch = state.get("last_epoch", self.best_epoch + self.bad_epochs)


def check_splits(data: PreparedData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, val and test row indices; raise ``TokbenchError`` if training cannot start.

    Training needs a non-empty training split holding at least two cell types and a
    non-empty validation split (early stopping and best-weights selection read it). The
    test split may be empty until ``test()`` is called.
    """
    train, val, test = (data.split_indices(name) for name in ("train", "val", "test"))
    hint = "check the split settings (split.kind, split.key, split.train/val/test) and the label column"
    if len(train) == 0:
        raise TokbenchError(f"the training split is empty: no cell is assigned to 'train'; {hint}")
    if len(val) == 0:
        raise TokbenchError(f"the validation split is empty: no cell is assigned to 'val'; {hint}")
    labels = np.asarray(data.labels)
    if labels.min() < 0 or labels.max() >= len(data.class_names):
        raise TokbenchError(
            f"labels must be class ids in 0..{len(data.class_names) - 1}, found {labels.min()}..{labels.max()}"
        )
    present = np.unique(labels[train])
    if len(present) < 2:
        name = data.class_names[present[0]] if len(present) else "none"
        raise TokbenchError(
            f"the training split holds a single cell type ({name!r}) across {len(train)} cells; "
            f"cell-type annotation needs at least two; {hint}"
        )
    return train, val, test


def test_result(scores: dict, class_names: list[str], stopper: EarlyStopping, track_metric: str) -> dict:
    """Name the test-split ``scores`` of ``AnnotationMetrics.compute`` as ``test()`` returns them."""
    return {
        "test_accuracy": scores["accuracy"],
        "test_macro_f1": scores["macro_f1"],
        "test_mcc": scores["mcc"],
        "test_loss": scores["loss"],
        "test_n_cells": scores["n_cells"],
        "test_confusion_matrix": scores["confusion_matrix"],
        "test_per_class_accuracy": scores["per_class_accuracy"],
        "test_predicted_classes": scores["predicted_classes"],
        "test_true_classes": scores["true_classes"],
        "class_names": list(class_names),
        "best_epoch": stopper.best_epoch,
        f"best_val_{track_metric}": stopper.best_value,
    }


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (:func:`tokbench.fileio.atomic_path`):
    a crash mid-write leaves the previous checkpoint intact and no partial file behind."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_checkpoint_file(directory: Path) -> dict:
    """Read ``directory/trainer.pt`` onto the CPU; ``TokbenchError`` if it is missing."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise TokbenchError(f"no checkpoint at {path}; pass the directory a previous save_checkpoint() wrote")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Global RNG states (torch CPU and CUDA, numpy, Python) in a ``weights_only``-loadable form."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module state dict (so later updates do not change it)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ----------------------------------------------------------------------------------------
# Optimiser and schedule


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices and embeddings only.

    Biases and LayerNorm gains (1-D parameters) are not decayed, as in GPT-2 / nanoGPT.
    Frozen parameters (e.g. pretrained gene vectors) are left out. Fused kernel on CUDA.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type == "cuda")


def lr_factor(step: int, total_steps: int, warmup_steps: int, name: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then either
    constant or a half-cosine down to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimiser step over ``total_steps`` steps."""
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    factor = partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps,
                     name=cfg.name, min_lr_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------
# Batches


class _TokeniseBatch:
    """Row indices → (CellSentences, labels, seconds spent tokenising) on the CPU: the
    ``collate_fn`` of the DataLoader workers and the job of the prefetch thread. ``pin``
    puts the tensors in pinned memory, for non-blocking copies to a CUDA device."""

    def __init__(self, tokenizer: Tokenizer, labels: np.ndarray, epoch: int, pin: bool = False):
        self.tokenizer, self.labels, self.epoch, self.pin = tokenizer, labels, epoch, pin

    def __call__(self, cells: np.ndarray) -> tuple[CellSentences, torch.Tensor, float]:
        start = time.perf_counter()
        sentences, labels = self.tokenizer.sentences(cells, self.epoch, "cpu"), torch.from_numpy(self.labels[cells])
        if self.pin:
            sentences, labels = sentences.pin_memory(), labels.pin_memory()
        return sentences, labels, time.perf_counter() - start


def one_intra_op_thread() -> None:
    """Run the calling thread's torch CPU operations on that thread alone (its own OpenMP team
    size; other threads keep theirs).

    For the prefetch thread: a second OpenMP team beside the training step's, both spinning at
    their barriers, oversubscribes the cores: on 2 cores it slowed the median training step by
    about 7% (338 against 316 ms) for tokenisation worth 0.1% of it. Torch sizes a thread's
    team on its first parallel call, so that happens first, then the OpenMP limit (through
    ``threadpoolctl``, which leaves BLAS alone).
    """
    torch.get_num_threads()
    threadpool_limits(1, user_api="openmp")


def prefetched(items: Sequence[_Item], make: Callable[[_Item], _Result],
               initializer: Optional[Callable[[], None]] = None) -> Iterator[_Result]:
    """``make(item)`` for each of ``items``, in order, each made in a background thread while
    the caller works on the previous result: one item ahead, never more.

    ``make`` runs in a thread whose name starts with ``PREFETCH_THREAD``; it must not draw
    from the global torch, numpy or Python generators, which the caller's work may use. An
    exception raised by ``make`` is raised here, in the caller, with the thread's frames in
    its traceback. The thread ends when the items run out, when an exception leaves this
    generator, and when the caller closes it early (``contextlib.closing``); stopping waits
    for the item in progress. ``initializer`` runs first in the thread (e.g.
    :func:`one_intra_op_thread`).
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=PREFETCH_THREAD, initializer=initializer)
    try:
        pending: Optional[Future] = pool.submit(make, items[0]) if len(items) else None
        for i in range(len(items)):
            result = pending.result()
            # The next item is made while the caller works on this one.
            pending = pool.submit(make, items[i + 1]) if i + 1 < len(items) else None
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------
# The trainer


class EpochRunner:
    """What the transformer loop and the baseline share: the splits and labels, ``fit``, the
    best-weights ``test``, the step guards, early-stopping bookkeeping and checkpoint files.

    Subclasses call ``super().__init__`` and provide ``step`` (starting with
    ``_check_can_step``, ending with ``_finish_epoch``), ``_evaluate``, ``model_state`` /
    ``load_model_state`` (the defaults read and write ``self.model``), and ``state_dict`` /
    ``load_state_dict`` built on ``_progress_state`` / ``_load_progress``.
    """

    def __init__(self, data: PreparedData, cfg, run_dir: str | os.PathLike, *, device: torch.device,
                 on_batch: Optional[BatchCallback], stopper: EarlyStopping):
        """``cfg``: the subclass's validated config (``track_metric``, ``max_epochs``, ...).

        Raises ``TokbenchError`` (see :func:`check_splits`) when the splits cannot train a
        classifier, before anything is built.
        """
        self.train_cells, self.val_cells, self.test_cells = check_splits(data)
        self.data, self.cfg = data, cfg
        self.run_dir = Path(run_dir).resolve()
        self.device = device
        self.on_batch = on_batch
        self.class_names = list(data.class_names)
        self.labels = np.asarray(data.labels, dtype=np.int64)
        self.stopper = stopper
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self.best_state: Optional[dict] = None
        self._test_result: Optional[dict] = None

    def _check_can_step(self, epochs: int, when_done: str) -> None:
        """Refuse another ``step()`` once ``test()`` has run, or once ``epochs`` epochs are
        done (``TokbenchError`` saying ``when_done``)."""
        if self._test_result is not None:
            raise TokbenchError("the test split has been scored already; training cannot continue after test()")
        if self.epoch >= epochs:
            raise TokbenchError(when_done)

    def _finish_epoch(self, val: dict, train_loss: float, speed: dict, finished: bool = False) -> dict:
        """Count the epoch, update early stopping (keeping the best weights) and return the
        epoch's metrics (keys documented on ``AnnotationTrainer.step``), also kept in the
        history. ``finished`` ends the run whatever early stopping says."""
        self.epoch += 1
        metric = self.cfg.track_metric
        if self.stopper.update(self.epoch, val[metric]):
            self.best_state = self.model_state()
        result = {
            "epoch": self.epoch,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "val_mcc": val["mcc"],
            "val_predicted_classes": val["predicted_classes"],
            "val_true_classes": val["true_classes"],
            **speed,
            f"best_val_{metric}": self.stopper.best_value,
            "best_epoch": self.stopper.best_epoch,
            "should_stop": finished or self.stopper.should_stop or self.epoch >= self.cfg.max_epochs,
        }
        self.history.append(result)
        return result

    def fit(self, on_epoch: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Call ``step()`` until it says stop; ``on_epoch`` gets each epoch's metrics. Returns the history."""
        while not (self.history and self.history[-1]["should_stop"]):
            result = self.step()
            if on_epoch is not None:
                on_epoch(result)
        return self.history

    def test(self) -> dict:
        """Score the test split once, with the weights of the best validation epoch.

        The model keeps those weights afterwards and ``step()`` refuses to continue; a second
        call returns the same result. Keys: ``test_accuracy``, ``test_macro_f1``,
        ``test_mcc``, ``test_loss``, ``test_n_cells``, ``test_confusion_matrix`` (int64
        numpy, rows true / columns predicted, class-id order), ``test_per_class_accuracy``
        (float numpy, NaN where a class has no test cell), ``test_predicted_classes`` and
        ``test_true_classes`` (distinct classes predicted / present; see
        ``metrics.degenerate_splits``), ``class_names`` (class-id order), ``best_epoch``,
        ``best_val_<track_metric>``.
        """
        if self._test_result is not None:
            return self._test_result
        if self.best_state is None:
            raise TokbenchError("no epoch has been trained yet: call step() or fit() before test()")
        if len(self.test_cells) == 0:
            raise TokbenchError("the test split is empty: no cell is assigned to 'test'; check the split settings")
        self.load_model_state(self.best_state)
        self._test_result = self.evaluate_test()
        return self._test_result

    def model_state(self) -> dict:
        """A CPU copy of the current weights (what ``best_model.pt`` holds)."""
        return cpu_copy(self.model.state_dict())

    def load_model_state(self, state: dict) -> None:
        """Set the weights from a ``model_state()``."""
        self.model.load_state_dict(state)

    def evaluate_split(self, name: str) -> dict:
        """Metrics of the current weights on split ``name`` (``train``, ``val``, ``test``),
        as ``AnnotationMetrics.compute`` returns them; after ``test()`` these are the best
        validation epoch's weights."""
        return self._evaluate(self.data.split_indices(name))

    def evaluate_test(self) -> dict:
        """Test metrics of the *current* weights, keyed as ``test()`` returns them.

        A sweep calls this right after each new best validation epoch, so its last value is
        the test score of the best weights even for a trial the scheduler stops early. The
        test split never influences training or model selection.
        """
        return test_result(self._evaluate(self.test_cells), self.class_names, self.stopper, self.cfg.track_metric)

    # -- checkpoints ---------------------------------------------------------------------

    def _progress_state(self) -> dict:
        """The checkpoint entries every runner writes: ``epoch``, ``early_stopping``,
        ``best_model``, ``history``, ``class_names``."""
        return {
            "epoch": self.epoch,
            "early_stopping": self.stopper.state_dict(),
            "best_model": self.best_state,
            "history": self.history,
            "class_names": self.class_names,
        }

    def _load_progress(self, state: dict) -> None:
        """Restore what ``_progress_state`` wrote (after the subclass checked ``state``)."""
        self.stopper.load_state_dict(state["early_stopping"])
        self.best_state = state["best_model"]
        self.history = list(state["history"])
        self.epoch = state["epoch"]
        self._test_result = None

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """Write ``state_dict()`` atomically to ``directory/trainer.pt`` (default: ``run_dir``); return the path."""
        path = Path(directory if directory is not None else self.run_dir) / CHECKPOINT_FILE
        atomic_save(self.state_dict(), path)
        return path

    def load_checkpoint(self, directory: str | os.PathLike | None = None) -> None:
        """Restore from ``directory/trainer.pt`` (default: ``run_dir``)."""
        self.load_state_dict(load_checkpoint_file(Path(directory if directory is not None else self.run_dir)))


class AnnotationTrainer(EpochRunner):
    """Trains a ``CellClassifier`` on one tokenizer and dataset; one epoch per ``step()``.

    ``run_dir`` is this run's own directory: checkpoints go there (or into the directory
    passed to ``save_checkpoint``), never to a shared default. It is created on first save.
    ``device`` overrides ``trainer_cfg.device`` (a Ray trial passes the GPU it was given).
    ``on_batch(n_cells_done, n_cells_total, cells_per_second)`` is called after every
    training batch, e.g. to drive a progress bar.

    Raises ``TokbenchError`` before anything trains when a config value is invalid, the
    training or validation split is empty, or the training split has fewer than two classes.
    """

    def __init__(self, data: PreparedData, tokenizer: Tokenizer, model_cfg: ModelConfig,
                 optim_cfg: OptimizerConfig, sched_cfg: SchedulerConfig, trainer_cfg: TrainerConfig,
                 run_dir: str | os.PathLike, *, device: torch.device | str | None = None,
                 on_batch: Optional[BatchCallback] = None):
        validate_model_config(model_cfg)
        validate_optimizer_config(optim_cfg)
        validate_scheduler_config(sched_cfg)
        validate_trainer_config(trainer_cfg)
        stopper = EarlyStopping(trainer_cfg.patience, trainer_cfg.min_delta, trainer_cfg.early_stopping,
                                trainer_cfg.min_epochs)
        super().__init__(data, trainer_cfg, run_dir, on_batch=on_batch, stopper=stopper,
                         device=resolve_device(device if device is not None else trainer_cfg.device))
        self.tokenizer = tokenizer
        self.use_amp = resolve_amp(trainer_cfg.amp, self.device)
        # Expressed genes per cell: the sentence length before truncation/sampling, used to
        # group cells of similar length and to order evaluation batches.
        self.cell_lengths = np.diff(np.asarray(data.indptr))

        torch.manual_seed(trainer_cfg.seed)
        self.model = CellClassifier(tokenizer.embedder, model_cfg, len(self.class_names)).to(self.device)
        self.optimizer = build_optimizer(self.model, optim_cfg, self.device)
        self.steps_per_epoch = math.ceil(len(self.train_cells) / trainer_cfg.batch_size)
        self.scheduler = build_scheduler(self.optimizer, sched_cfg, trainer_cfg.max_epochs * self.steps_per_epoch)

    # -- batches -------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else nullcontext()

    def _sentence_batches(self, batches: list[np.ndarray],
                          epoch: int) -> Iterator[tuple[CellSentences, torch.Tensor, float]]:
        """Yield (sentences, labels, seconds spent tokenising them) on the training device for
        each batch of row indices: tokenised in loader workers (``num_workers`` > 0), in the
        prefetch thread one batch ahead (``prefetch``), or here, on the training device.
        Close the generator when leaving early (it may own a thread)."""
        cuda = self.device.type == "cuda"
        if self.cfg.num_workers > 0:
            # A private generator: the loader draws worker seeds from it, and drawing them from
            # the global RNG would shift this epoch's dropout masks away from the other modes.
            loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=self.cfg.num_workers,
                                collate_fn=_TokeniseBatch(self.tokenizer, self.labels, epoch),
                                pin_memory=cuda, generator=torch.Generator())
            for sentences, labels, seconds in loader:
                yield sentences.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), seconds
        elif self.cfg.prefetch:
            # The thread tokenises on the CPU (the compiled kernel runs without the GIL) while
            # this thread trains; the copy to a GPU is queued here, behind the running step.
            make = _TokeniseBatch(self.tokenizer, self.labels, epoch, cuda)
            for sentences, labels, seconds in prefetched(batches, make, one_intra_op_thread):
                yield sentences.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), seconds
        else:
            for cells in batches:
                start = time.perf_counter()
                sentences = self.tokenizer.sentences(cells, epoch, self.device)
                seconds = time.perf_counter() - start
                yield sentences, torch.from_numpy(self.labels[cells]).to(self.device, non_blocking=True), seconds

    # -- one epoch -----------------------------------------------------------------------

    def step(self) -> dict:
        """Train one epoch, score validation, update early stopping; return the epoch's metrics.

        Keys: ``epoch`` (1-based), ``train_loss`` (mean cross-entropy, nats),
        ``val_loss``, ``val_accuracy``, ``val_macro_f1``, ``val_mcc``,
        ``val_predicted_classes`` and ``val_true_classes`` (distinct classes predicted /
        present on validation), ``lr`` (at the epoch's
        last step), ``cells_per_second`` and ``tokens_per_second`` (training only; tokens are
        non-pad positions), ``train_seconds``, ``epoch_seconds`` (training + validation),
        ``padded_fraction`` (pad share of all training positions), ``data_fraction`` (share of
        training time the loop waited for its next batch: the whole tokenisation when it runs
        inside the step, only what the prefetch thread or the loader workers did not hide
        otherwise; on CUDA approximate, as steps are not synchronised), ``tokenise_fraction``
        (time spent tokenising the training batches, wherever it ran, as a share of training
        time; in the background it overlaps training), ``best_val_<track_metric>``,
        ``best_epoch``, ``should_stop``.
        """
        cfg, device, model = self.cfg, self.device, self.model
        self._check_can_step(cfg.max_epochs, f"trainer.max_epochs: all {cfg.max_epochs} epochs are done")
        epoch_index = self.epoch  # 0-based: what the tokenizer and the random streams see
        t_epoch = time.perf_counter()

        torch.manual_seed(stream_seed(cfg.seed, epoch_index, _DROPOUT_STREAM))
        lengths = self.cell_lengths if cfg.bucket_by_length else None
        batches = epoch_batches(self.train_cells, cfg.batch_size, cfg.seed, epoch_index, lengths, cfg.bucket_batches)
        n_total = len(self.train_cells)
        params = [p for p in model.parameters() if p.requires_grad]
        # Running sums stay on the device: reading them every step would stall a GPU.
        loss_sum = torch.zeros((), device=device)
        pad_tokens = torch.zeros((), dtype=torch.long, device=device)
        all_tokens, n_done, data_seconds, tokenise_seconds, lr = 0, 0, 0.0, 0.0, 0.0

        model.train()
        t_train = t0 = time.perf_counter()
        with closing(self._sentence_batches(batches, epoch_index)) as stream:
            for sentences, labels, seconds in stream:
                t1 = time.perf_counter()
                with self._autocast():
                    logits = model(sentences)
                loss = F.cross_entropy(logits.float(), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()

                n_done += len(labels)
                loss_sum += loss.detach() * len(labels)
                pad_tokens += sentences.padding_mask.sum()
                all_tokens += sentences.padding_mask.numel()
                data_seconds += t1 - t0
                tokenise_seconds += seconds
                t0 = time.perf_counter()
                if self.on_batch is not None:
                    self.on_batch(n_done, n_total, n_done / max(t0 - t_train, 1e-9))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = max(time.perf_counter() - t_train, 1e-9)

        val = self._evaluate(self.val_cells)
        pad = int(pad_tokens)
        return self._finish_epoch(val, float(loss_sum) / n_total, {
            "lr": lr,
            "cells_per_second": n_total / train_seconds,
            "tokens_per_second": (all_tokens - pad) / train_seconds,
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - t_epoch,
            "padded_fraction": pad / max(all_tokens, 1),
            "data_fraction": data_seconds / train_seconds,
            "tokenise_fraction": tokenise_seconds / train_seconds,
        })

    @torch.inference_mode()
    def _evaluate(self, cells: np.ndarray) -> dict:
        """Metrics of the current weights on ``cells`` (see ``AnnotationMetrics.compute``)."""
        self.model.eval()
        # Order does not change the metrics; sorting by length minimises padding.
        cells = cells[np.argsort(self.cell_lengths[cells], kind="stable")]
        size = self.cfg.eval_batch_size or 4 * self.cfg.batch_size
        batches = [cells[i : i + size] for i in range(0, len(cells), size)]
        metrics = AnnotationMetrics(len(self.class_names), self.device)
        with closing(self._sentence_batches(batches, EVAL_EPOCH)) as stream:
            for sentences, labels, _ in stream:
                with self._autocast():
                    logits = self.model(sentences)
                metrics.update(logits, labels)
        return metrics.compute()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: model, optimiser, scheduler, RNG
        states, epochs done, early-stopping state, best weights and the metric history."""
        return {
            "format": CHECKPOINT_FORMAT,
            **self._progress_state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; ``TokbenchError`` if it belongs to a different setup."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TokbenchError(
                f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}; "
                f"it was written by another tokbench version"
            )
        if list(state["class_names"]) != self.class_names:
            raise TokbenchError(
                "the checkpoint was trained on other cell types than this dataset's; resume with the same data config"
            )
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise TokbenchError(
                f"the checkpoint ran {state['steps_per_epoch']} steps per epoch, this setup {self.steps_per_epoch}; "
                f"resume with the same data split and trainer.batch_size"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._load_progress(state)
        set_rng_state(state["rng"])
