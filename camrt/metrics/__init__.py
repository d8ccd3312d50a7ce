"""Evaluation metrics for `camrt eval` (plugins of the `register_metrics` hook) and the runner.

One module per metric, each citing its paper: deletion / insertion AUC (RISE), confidence
(Grad-CAM++'s average drop / increase, pytorch-grad-cam's confidence change), ROAD, the pointing
game, and the model-randomization sanity check.
"""
