#!/usr/bin/env python3
"""Write reference.safetensors: one airbench94 training step computed by PyTorch in float64.

Written from the README's description of the network ("Checkpoints": the modules, their names and
the forward pass) and of the recipe (README "Recipes", airbench94 row), with torch.nn modules and
torch.optim.SGD, so it checks speedrun's conventions independently of hand-written formulas:
BatchNorm2d (momentum 0.4, so running = 0.6·old + 0.4·batch with the unbiased variance; eps 1e-12;
γ frozen at 1), exact GELU, summed cross-entropy with label smoothing 0.2, logits × 1/9,
Nesterov SGD (momentum 0.85) with airbench94's two parameter groups and its lr schedule's first
multiplier (0.2), and TTA level 2 (mirror, and reflect-padded translations by one pixel).

The batch is the first 16 images of test_batch.bin of DATA_DIR (a CIFAR-10 binary folder), not
augmented. The whitening filters come from the 2×2 patches of those same 16 images (15,376
patches), so the file is self-contained: the tests need no dataset to use it. Widths 16,32,32 keep
the file under 1 MB; every convention is the same as at 64,256,256.

Usage:  python3 make_reference.py DATA_DIR reference.safetensors
Needs:  pip install torch numpy safetensors   (CPU is enough; everything runs in float64)
"""
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_default_dtype(torch.float64)
torch.manual_seed(1)

WIDTHS = (16, 32, 32)
BATCH = 16
MOMENTUM, NESTEROV = 0.85, True
LR, WD, BIAS_SCALER = 11.5, 0.0153, 64.0  # per 1024 examples, as airbench94 states them
RECIPE_BATCH, RECIPE_STEPS = 1024, 476
LABEL_SMOOTHING, LOGIT_SCALE = 0.2, 1 / 9
BN_EPS, BN_MOMENTUM = 1e-12, 0.6  # running = BN_MOMENTUM·old + (1 − BN_MOMENTUM)·batch
WHITEN_EPS = 5e-4
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_images(path, n):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)[:n]
    return torch.from_numpy(raw[:, 1:].reshape(n, 3, 32, 32).copy()), torch.from_numpy(raw[:, 0].astype(np.int64))


def normalise(u8):
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (u8.double() / 255.0 - mean) / std


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=1 - BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=1 - BN_MOMENTUM)
        for conv in (self.conv1, self.conv2):  # default init, then identity on the first filters
            w = conv.weight.data
            nn.init.dirac_(w[: w.size(1)])
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)  # γ = 1, frozen

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.block1 = Block(24, WIDTHS[0])
        self.block2 = Block(WIDTHS[0], WIDTHS[1])
        self.block3 = Block(WIDTHS[1], WIDTHS[2])
        self.head = nn.Linear(WIDTHS[2], 10, bias=False)

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        x = self.block3(self.block2(self.block1(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # the last map is 3×3: a global max
        return self.head(x) * LOGIT_SCALE


def whitening(x):
    """± eigenvectors / sqrt(λ + eps) of the uncentered covariance of the 2×2×3 patches."""
    patches = F.unfold(x, kernel_size=2).transpose(1, 2).reshape(-1, 12)  # (c, ky, kx) order
    cov = patches.T @ patches / patches.shape[0]
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    filters = (vectors.T / torch.sqrt(values + WHITEN_EPS)[:, None]).reshape(12, 3, 2, 2)
    return values, torch.cat([filters, -filters])


def tta(net, x):
    mirror = lambda v: 0.5 * net(v) + 0.5 * net(torch.flip(v, dims=[3]))  # noqa: E731
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    return 0.5 * mirror(x) + 0.5 * torch.stack([mirror(s) for s in shifted]).mean(0)


def snapshot(net, prefix, names):
    state = net.state_dict()
    return {f"{prefix}.{k}": state[k].detach().clone() for k in names}


def main():
    data, out = sys.argv[1], sys.argv[2]
    images, labels = read_images(f"{data}/test_batch.bin", BATCH)
    x = normalise(images)
    net = Net()
    eigenvalues, filters = whitening(x)
    net.whiten.weight.data.copy_(filters)

    # The tensors a checkpoint holds (BatchNorm γ = 1 is not stored).
    stored = [k for k in net.state_dict() if not k.endswith(("norm1.weight", "norm2.weight", "num_batches_tracked"))]
    running = [k for k in stored if "running_" in k]
    trainable = {k: p for k, p in net.named_parameters() if p.requires_grad}

    out_tensors = {"input.images_u8": images, "input.labels": labels, "whiten.eigenvalues": eigenvalues}
    out_tensors.update(snapshot(net, "init", stored))

    # airbench94's optimizer: PyTorch SGD, lr and weight decay per 1024 examples turned into
    # per-step values; BatchNorm biases at 64× the lr; the lr schedule's first multiplier is 0.2.
    kilostep = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr, wd = LR / kilostep, WD * RECIPE_BATCH / kilostep
    lr_bias = lr * BIAS_SCALER
    norm_biases = [p for k, p in trainable.items() if ".norm" in k]
    others = [p for k, p in trainable.items() if ".norm" not in k]
    opt = torch.optim.SGD(
        [dict(params=norm_biases, lr=lr_bias, weight_decay=wd / lr_bias), dict(params=others, lr=lr, weight_decay=wd / lr)],
        momentum=MOMENTUM,
        nesterov=NESTEROV,
    )
    warmup = int(0.2 * RECIPE_STEPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(np.interp(s, [0, warmup, RECIPE_STEPS], [0.2, 1.0, 0.0])))
    assert abs(opt.param_groups[0]["lr"] - 0.2 * lr_bias) < 1e-18

    net.train()
    logits = net(x)
    loss = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING, reduction="sum")
    opt.zero_grad()
    loss.backward()
    out_tensors["train.logits"] = logits.detach().clone()
    out_tensors["train.loss"] = loss.detach().reshape(1).clone()
    out_tensors.update({f"grad.{k}": p.grad.detach().clone() for k, p in trainable.items()})
    out_tensors.update(snapshot(net, "after_forward", running))
    opt.step()
    schedule.step()
    out_tensors.update(snapshot(net, "step1", list(trainable)))

    net.eval()
    with torch.no_grad():
        out_tensors["eval.tta_logits"] = tta(net, x)

    metadata = {
        "generator": "tests/reference/make_reference.py",
        "widths": ",".join(map(str, WIDTHS)),
        "batch": f"the first {BATCH} images of test_batch.bin",
        "whitening": "input.images_u8",
        "torch": torch.__version__,
    }
    save_file({k: v.contiguous() for k, v in out_tensors.items()}, out, metadata=metadata)
    print(f"wrote {out}: loss {loss.item():.9f}, {len(out_tensors)} tensors, torch {torch.__version__}")


if __name__ == "__main__":
    main()
