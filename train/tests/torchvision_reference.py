"""Reference outputs from torchvision's EfficientNetV2 for Ladder's equivalence tests.

usage: torchvision_reference.py tensors VARIANT OUT.safetensors
         the state dict ("state."), an input batch, eval logits, and one train-mode step
         (dropout and stochastic depth off): logits, loss, gradients ("grad.") and the
         BatchNorm buffers after it ("after.")
       torchvision_reference.py shapes VARIANT CLASSES OUT.json
         every state-dict name with its shape and dtype, and the parameter count
       torchvision_reference.py pretrained VARIANT CLASSES OUT.safetensors
         a seeded model's state dict as a user saves pretrained weights for `model.init_from`
       torchvision_reference.py load VARIANT CLASSES MODEL.safetensors INPUT.safetensors OUT.safetensors
         loads a Ladder model file with load_state_dict (strict) and writes its eval logits
         for the "input" tensor of INPUT
"""
import json
import sys

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)


def build(variant, classes):
    ctor = getattr(torchvision.models, f"efficientnet_v2_{variant}")
    return ctor(num_classes=classes, dropout=0.0, stochastic_depth_prob=0.0)


def tensors(variant, out):
    torch.manual_seed(0)
    model = build(variant, 10)
    # Give BatchNorm non-trivial statistics and affine parameters, so a mix-up of
    # running_mean and running_var or of weight and bias cannot pass.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    result = {f"state.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 96, 96)
    labels = torch.tensor([1, 7])
    model.eval()
    with torch.no_grad():
        result["eval_logits"] = model(x)
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    result["input"] = x
    result["labels"] = labels
    result["train_logits"] = logits.detach()
    result["loss"] = loss.detach().reshape(1)
    for name, p in model.named_parameters():
        result[f"grad.{name}"] = p.grad.contiguous()
    for name, b in model.named_buffers():
        result[f"after.{name}"] = b.clone().contiguous()
    save_file(result, out)


def shapes(variant, classes, out):
    with torch.device("meta"):
        model = build(variant, classes)
    entries = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())
    with open(out, "w") as f:
        json.dump({"state": entries, "parameters": parameters}, f)


def pretrained(variant, classes, out):
    torch.manual_seed(1)
    model = build(variant, classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


def load(variant, classes, model_file, input_file, out):
    model = build(variant, classes)
    model.load_state_dict(load_file(model_file), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(load_file(input_file)["input"])
    save_file({"logits": logits}, out)


if __name__ == "__main__":
    if sys.argv[1] == "tensors":
        tensors(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "pretrained":
        pretrained(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "shapes":
        shapes(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        load(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
