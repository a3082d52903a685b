"""``plasticity tune``: Optuna studies over any recipe, each trial an ordinary ``plasticity fit`` run.

Search files (:class:`~plasticity_lightning.tune.search.SearchSpec`) map config keys to distributions and name the
objectives; a study runs in any Optuna storage (local SQLite by default), with several worker processes or
machines, heartbeats and retries of trials whose worker died; the best trial is written as a recipe
(``best.yaml``) and the study as a report.
"""

# Importing the package loads nothing heavy: Optuna, Lightning and torch come with the submodules that use them
# (plasticity_lightning.tune.search, .study, .report, .cli).
