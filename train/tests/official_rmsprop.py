"""An independent oracle of the official EfficientNetV2 optimizer step, in numpy (float64).

Written from the definitions the official code uses (google/automl efficientnetv2: main.py's
model_fn and utils.py): TensorFlow 1's RMSPropOptimizer (decay 0.9, momentum 0.9, epsilon 1e-3
inside the square root, the mean-square slot starting at ones, the momentum slot at zeros,
the learning rate applied before the momentum), an L2 loss of weight_decay * sum(w^2) / 2 on
every variable but biases and BatchNorm's (so its gradient adds weight_decay * w), and
tf.train.ExponentialMovingAverage with num_updates (decay min(d, (1 + t) / (10 + t))).

Usage: official_rmsprop.py DIR. Reads DIR/case.json (sizes, hyperparameters) and the raw
little-endian float32 arrays it names; writes DIR/params.f64 and DIR/ema.f64.
"""

import json
import sys
from pathlib import Path

import numpy as np


def main():
    d = Path(sys.argv[1])
    case = json.loads((d / "case.json").read_text())
    n, steps = case["elements"], case["steps"]
    read = lambda name: np.fromfile(d / name, dtype="<f4").astype(np.float64)
    w = read("params.f32")
    mask = read("mask.f32")
    grads = read("grads.f32").reshape(steps, n)
    lrs = case["learning_rates"]
    rho, momentum, eps = case["decay"], case["momentum"], case["eps"]
    weight_decay, ema_decay = case["weight_decay"], case["ema_decay"]
    ms, mom, ema = np.ones(n), np.zeros(n), w.copy()
    for t in range(steps):
        g = grads[t] + weight_decay * mask * w
        ms = rho * ms + (1 - rho) * g * g
        mom = momentum * mom + lrs[t] * g / np.sqrt(ms + eps)
        w = w - mom
        # The EMA is applied after the step, counting it (num_updates = the new global step).
        decay = min(ema_decay, (1.0 + (t + 1)) / (10.0 + (t + 1)))
        ema = decay * ema + (1 - decay) * w
    w.astype("<f8").tofile(d / "params.f64")
    ema.astype("<f8").tofile(d / "ema.f64")


if __name__ == "__main__":
    main()
