"""Studies: grids of many small models trained at once (Neural Elements-style) and their results store.

``plasticity study run recipes/studies/<spec>.yaml`` trains a grid; :class:`StackedMLP` and :func:`train_stacked`
train R runs of one architecture in one process step; :class:`ResultStore` keeps one SQLite row per finished run.
"""

from plasticity_lightning.studies.stacked import StackedHistory, StackedMLP, train_stacked
from plasticity_lightning.studies.store import ResultStore, merge_stores
from plasticity_lightning.studies.study import StudySpec, run_group, run_study

__all__ = [
    "ResultStore",
    "StackedHistory",
    "StackedMLP",
    "StudySpec",
    "merge_stores",
    "run_group",
    "run_study",
    "train_stacked",
]
