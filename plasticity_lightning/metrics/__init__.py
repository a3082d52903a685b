"""Pure tensor metrics (no Lightning): a functional form plus a torchmetrics ``Metric`` twin where values
accumulate over batches (DDP-synchronised for free).

* rank of a feature matrix: :func:`effective_rank`, :func:`srank`, :func:`approximate_rank`,
  :func:`numerical_rank`, :func:`stable_rank` (see :mod:`plasticity_lightning.metrics.rank`);
* unit activity: ReDo τ-dormant, dead and low-activity units (:mod:`~plasticity_lightning.metrics.activity`);
* entropies of predictions, activations and attention (:mod:`~plasticity_lightning.metrics.entropy`);
* weight statistics (:mod:`~plasticity_lightning.metrics.weights`);
* learning-dynamics summaries of a training history (:mod:`~plasticity_lightning.metrics.dynamics`);
* per-task accuracy of continual streams (:mod:`~plasticity_lightning.metrics.continual`);
* Softmax Collapse and naive-loss-minimisation alignment (:mod:`~plasticity_lightning.metrics.collapse`).
"""

from plasticity_lightning.metrics.activity import (
    ActivityStatistics,
    UnitActivity,
    active_share,
    activity_statistics,
    dead_unit_fraction,
    dead_unit_mask,
    low_activity_fraction,
    low_activity_mask,
    mean_abs_activation,
    redo_dormant_fraction,
    redo_dormant_mask,
    redo_scores,
    unit_view,
)
from plasticity_lightning.metrics.collapse import (
    SoftmaxCollapse,
    logit_norm,
    nlm_alignment,
    softmax_collapse_fraction,
    zero_loss_fraction,
)
from plasticity_lightning.metrics.continual import PerTaskAccuracy, per_task_accuracy
from plasticity_lightning.metrics.dynamics import (
    DynamicsThresholds,
    classify_training_pattern,
    convergence_epoch,
    dynamics_summary,
    generalization_gap,
    gradient_health,
    learning_curve,
    loss_convergence_epoch,
    loss_stability,
    weight_evolution,
)
from plasticity_lightning.metrics.entropy import (
    ActivationEntropy,
    AttentionEntropy,
    PredictionEntropy,
    activation_entropy,
    attention_entropy,
    prediction_entropy,
)
from plasticity_lightning.metrics.rank import (
    ApproximateRank,
    EffectiveRank,
    FeatureSpectrum,
    NonFiniteFeaturesError,
    SRank,
    StableRank,
    approximate_rank,
    effective_rank,
    feature_matrix,
    numerical_rank,
    rank_measures,
    singular_values,
    srank,
    stable_rank,
)
from plasticity_lightning.metrics.text import (
    degeneration_summary,
    distinct_n,
    max_token_repetition,
    repeated_ngram_rate,
)
from plasticity_lightning.metrics.weights import (
    distance_from_init,
    gradient_stats,
    layer_weights,
    mean_abs_weight,
    weight_norm,
    weight_stats,
)

__all__ = [
    "ActivationEntropy",
    "ActivityStatistics",
    "ApproximateRank",
    "AttentionEntropy",
    "DynamicsThresholds",
    "EffectiveRank",
    "FeatureSpectrum",
    "NonFiniteFeaturesError",
    "PerTaskAccuracy",
    "PredictionEntropy",
    "SRank",
    "SoftmaxCollapse",
    "StableRank",
    "UnitActivity",
    "activation_entropy",
    "active_share",
    "activity_statistics",
    "approximate_rank",
    "attention_entropy",
    "classify_training_pattern",
    "convergence_epoch",
    "dead_unit_fraction",
    "dead_unit_mask",
    "degeneration_summary",
    "distance_from_init",
    "distinct_n",
    "dynamics_summary",
    "effective_rank",
    "feature_matrix",
    "generalization_gap",
    "gradient_health",
    "gradient_stats",
    "layer_weights",
    "learning_curve",
    "logit_norm",
    "loss_convergence_epoch",
    "loss_stability",
    "low_activity_fraction",
    "low_activity_mask",
    "max_token_repetition",
    "mean_abs_activation",
    "mean_abs_weight",
    "nlm_alignment",
    "numerical_rank",
    "per_task_accuracy",
    "prediction_entropy",
    "rank_measures",
    "redo_dormant_fraction",
    "redo_dormant_mask",
    "redo_scores",
    "repeated_ngram_rate",
    "singular_values",
    "softmax_collapse_fraction",
    "srank",
    "stable_rank",
    "unit_view",
    "weight_evolution",
    "weight_norm",
    "weight_stats",
    "zero_loss_fraction",
]
