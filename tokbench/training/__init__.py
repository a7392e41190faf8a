"""Training: the annotation loop, its configs, metrics and the logistic-regression baseline."""

from tokbench.training.baseline import LogisticRegressionBaseline
from tokbench.training.config import (
    BaselineConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
    validate_baseline_config,
    validate_optimizer_config,
    validate_scheduler_config,
    validate_trainer_config,
)
from tokbench.training.loop import AnnotationTrainer
from tokbench.training.metrics import (
    AnnotationMetrics,
    draw_confusion_matrix,
    plot_confusion_matrix,
    write_confusion_report,
)

__all__ = [
    "AnnotationMetrics",
    "AnnotationTrainer",
    "BaselineConfig",
    "LogisticRegressionBaseline",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainerConfig",
    "draw_confusion_matrix",
    "plot_confusion_matrix",
    "validate_baseline_config",
    "validate_optimizer_config",
    "validate_scheduler_config",
    "validate_trainer_config",
    "write_confusion_report",
]
