"""kdtw: knowledge distillation with training wheels.

A small student writes most tokens itself and hands single tokens to a large teacher through a
``<τ>`` action, within a teacher-use budget named in its prompt. This package is the library
(no Ray, no MLflow): config, budgets, models, data, decoding, losses, the oracle, metrics.
"""

__version__ = "0.1.0"
