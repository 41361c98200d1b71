"""A PyTorch reference loop of the official EfficientNetV2 recipe, to train beside Ladder.

torchvision's efficientnet_v2_s (dropout and stochastic depth off, BatchNorm momentum and
epsilon as the case says), from the weights Ladder starts from, on the batches Ladder trains
on, with the official code's training step written here: cross-entropy with label smoothing,
an L2 loss of weight_decay * sum(w^2) / 2 on every weight but biases and BatchNorm's,
TensorFlow 1's RMSProp (mean square from ones, epsilon inside the root, the learning rate before
the momentum) and an exponential moving average of the weights and BatchNorm statistics with
the decay min(d, (1 + t) / (10 + t)), t counting the updates.

Usage: reference_loop.py DIR. Reads DIR/case.json, DIR/initial.safetensors and
DIR/batches.safetensors; writes DIR/losses.json and DIR/ema.safetensors.
"""

import json
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file


def main():
    d = Path(sys.argv[1])
    case = json.loads((d / "case.json").read_text())
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(
        num_classes=case["classes"], dropout=0.0, stochastic_depth_prob=0.0
    )
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum, m.eps = case["bn_momentum"], case["bn_eps"]
    missing, unexpected = model.load_state_dict(load_file(d / "initial.safetensors"), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    params = dict(model.named_parameters())
    decayed = {name for name, p in params.items() if p.dim() > 1}
    ms = {n: torch.ones_like(p) for n, p in params.items()}
    mom = {n: torch.zeros_like(p) for n, p in params.items()}
    averaged = {n: t for n, t in model.state_dict().items() if not n.endswith("num_batches_tracked")}
    ema = {n: t.detach().clone() for n, t in averaged.items()}
    batches = load_file(d / "batches.safetensors")
    rho, momentum, eps = case["decay"], case["momentum"], case["eps"]
    losses = []
    model.train()
    for t, lr in enumerate(case["learning_rates"]):
        x, y = batches[f"x{t}"], batches[f"y{t}"]
        model.zero_grad()
        ce = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=case["label_smoothing"])
        l2 = case["weight_decay"] * sum((p * p).sum() / 2 for n, p in params.items() if n in decayed)
        (ce + l2).backward()
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad
                ms[n].mul_(rho).add_((1 - rho) * g * g)
                mom[n].mul_(momentum).add_(lr * g / torch.sqrt(ms[n] + eps))
                p.sub_(mom[n])
            updates = t + 1
            decay = min(case["ema_decay"], (1 + updates) / (10 + updates))
            current = model.state_dict()
            for n, v in ema.items():
                v.mul_(decay).add_((1 - decay) * current[n].float())
        losses.append(ce.item())
    (d / "losses.json").write_text(json.dumps(losses))
    save_file(ema, str(d / "ema.safetensors"))


if __name__ == "__main__":
    main()
