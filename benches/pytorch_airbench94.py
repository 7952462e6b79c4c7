#!/usr/bin/env python3
"""speedrun's default recipe, airbench94, in plain eager PyTorch on the CPU (float32).

The yardstick for `benches/cpu_vs_pytorch.sh` (issue 18): how fast does the framework
everyone would reach for train the same network, with the same recipe, on the same CPU, as
`speedrun train --backend cpu`? Written from the README's network description and
../shared/docs/recipe.md, and checked against src/recipe.rs, src/model.rs, src/train.rs,
src/whiten.rs and src/run.rs, so that an epoch here does the same work as one of speedrun's:
the same steps of the same batch size, the same layers, optimizer groups, schedule,
lookahead, augmentation and TTA views. It is not airbench's code.

Timing follows speedrun (and recipe.md section 3): one untimed warm-up step first, on a
throwaway copy of the network; then the clock covers the whitening init, every training
step (with its data loading and augmentation) and the final TTA over the test set. Loading
the files, building the network and its optimizer stay outside it, as in speedrun.

    python3 benches/pytorch_airbench94.py --data-dir target/test-data/cifar10 [--epochs 1]
    python3 benches/pytorch_airbench94.py --max-steps 3 --test-limit 2000   # smoke test

The last line printed is one JSON object (times in seconds, accuracies as fractions).
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- the recipe (src/recipe.rs, Config::default) ----
BATCH_SIZE = 1024
LR = 11.5  # per 1024 examples, "decoupled" form: see sgd_groups
MOMENTUM = 0.85
WEIGHT_DECAY = 0.0153  # per 1024 examples, decoupled form
BIAS_SCALER = 64.0  # BN biases train at 64x the base lr
LABEL_SMOOTHING = 0.2
WHITEN_BIAS_EPOCHS = 3.0
WHITEN_EPS = 5e-4
WHITEN_IMAGES = 5000
TRANSLATE = 2
WIDTHS = (64, 256, 256)
LOGIT_SCALE = 1.0 / 9.0
BN_MOMENTUM = 0.6  # speedrun's convention: running = 0.6 * running + 0.4 * batch
BN_EPS = 1e-12
WARMUP_FRAC, LR_START, LR_END = 0.23, 0.2, 0.07
LOOKAHEAD_EVERY, EMA_BASE = 5, 0.95
TTA_CHUNK = 2000  # airbench's eval chunk; BN uses running statistics, so results do not depend on it

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"


# ---- data ----

def batches_dir(data_dir: Path) -> Path:
    """`data_dir` or its cifar-10-batches-bin/, as speedrun looks for the files."""
    for d in (data_dir, data_dir / "cifar-10-batches-bin"):
        if all((d / f).is_file() for f in TRAIN_FILES + [TEST_FILE]):
            return d
    sys.exit(
        f"error: no CIFAR-10 binary batches (data_batch_1..5.bin, test_batch.bin) in {data_dir}: "
        f"run `speedrun download --data-dir {data_dir}`, or `../shared/cifar10-jpeg/unpack.sh {data_dir}` "
        f"for the JPEG-derived copy, or pass --data-dir"
    )


def load(files, folder: Path):
    """uint8 images (n, 3, 32, 32) and int64 labels (n) from CIFAR-10 binary batch files."""
    raw = b"".join((folder / f).read_bytes() for f in files)
    if len(raw) % RECORD:
        sys.exit(f"error: {folder} holds a batch file that is not whole {RECORD}-byte records")
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).contiguous(), records[:, 0].long()


def normalise(x_u8: torch.Tensor) -> torch.Tensor:
    # speedrun's load_batch: (pixel / 255 - mean) / std, in float32, per batch on the clock.
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x_u8.float() / 255.0 - mean) / std


# ---- network (src/model.rs) ----

class ConvGroup(nn.Module):
    """conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU: the pool sits before the first BN."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = batch_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = batch_norm(c_out)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


def batch_norm(c: int) -> nn.BatchNorm2d:
    # PyTorch's momentum is the weight of the new batch statistic: 1 - 0.6. Like speedrun it
    # normalises with the biased batch variance and tracks the unbiased one. gamma stays 1.
    bn = nn.BatchNorm2d(c, eps=BN_EPS, momentum=1.0 - BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


class Net(nn.Module):
    def __init__(self, widths=WIDTHS):
        super().__init__()
        # 12 eigen-filters of 2x2x3 patches and their negatives; the weight comes from the
        # data (init_whitening) and stays frozen, the bias trains for the first epochs.
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        c_in = 24
        self.blocks = nn.ModuleList()
        for w in widths:
            self.blocks.append(ConvGroup(c_in, w))
            c_in = w
        self.head = nn.Linear(c_in, 10, bias=False)

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        for block in self.blocks:
            x = block(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # the 3x3 global max (MaxPool2d(3) on 3x3)
        return self.head(x) * LOGIT_SCALE


def init_weights(net: Net):
    """speedrun's Layout::init: convs U(+-1/sqrt(9 c_in)) (PyTorch's default) with the first c_in
    filters identity (dirac), head U(+-1/sqrt(w3)), whitening and BN biases 0."""
    with torch.no_grad():
        for block in net.blocks:
            for conv in (block.conv1, block.conv2):
                c_out, c_in = conv.weight.shape[:2]
                conv.weight.uniform_(-1 / math.sqrt(9 * c_in), 1 / math.sqrt(9 * c_in))
                nn.init.dirac_(conv.weight[: min(c_in, c_out)])
            for bn in (block.norm1, block.norm2):
                bn.reset_parameters()  # gamma 1, beta 0, running mean 0 and var 1
        c = net.head.in_features
        net.head.weight.uniform_(-1 / math.sqrt(c), 1 / math.sqrt(c))
        net.whiten.bias.zero_()
        net.whiten.weight.zero_()


def init_whitening(net: Net, train_u8: torch.Tensor):
    """Whitening filters from the uncentered covariance of every 2x2 patch of the first 5,000
    training images (src/whiten.rs). speedrun sums exact integer moments and finishes in
    float64 (the smallest eigenvalues are ~1e-5 of the largest); float64 here keeps the same
    precision."""
    n = min(WHITEN_IMAGES, len(train_u8))
    cov = torch.zeros(12, 12, dtype=torch.float64)
    for start in range(0, n, 1000):  # in chunks: all 4.8 M patches in float64 would be 460 MB
        x = normalise(train_u8[start : min(start + 1000, n)]).double()
        patches = F.unfold(x, 2).transpose(1, 2).reshape(-1, 12)  # (c, ky, kx) order
        cov += patches.T @ patches
    cov /= n * 31 * 31
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # descending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + WHITEN_EPS)[:, None]).reshape(12, 3, 2, 2)
    with torch.no_grad():
        net.whiten.weight.copy_(torch.cat([filters, -filters]).float())


# ---- optimizer, schedule, lookahead (src/recipe.rs, src/train.rs) ----

def sgd_groups(net: Net, batch_size: int):
    """Nesterov SGD with airbench's decoupled hyperparameters: every parameter decays by the
    same lr*wd per step; the BN biases (beta) train at 64x the base lr."""
    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr = LR / kilostep_scale
    wd = WEIGHT_DECAY * batch_size / kilostep_scale
    lr_bias = lr * BIAS_SCALER
    bn_biases = [bn.bias for block in net.blocks for bn in (block.norm1, block.norm2)]
    # The whitening bias sits in the base group (base lr, not 64x), as in speedrun.
    base = [net.whiten.bias] + [blk.conv1.weight for blk in net.blocks] + [blk.conv2.weight for blk in net.blocks]
    base.append(net.head.weight)
    return [
        dict(params=base, lr=lr, weight_decay=wd / lr, initial_lr=lr),
        dict(params=bn_biases, lr=lr_bias, weight_decay=wd / lr_bias, initial_lr=lr_bias),
    ]


def lr_multiplier(step: int, total: int) -> float:
    """Linear 0.2 -> 1 over the first floor(0.23 T) steps, then 1 -> 0.07 (step is 0-based)."""
    warmup = int(WARMUP_FRAC * total)
    if step < warmup:
        frac = step / warmup
        return LR_START * (1 - frac) + frac
    frac = (step - warmup) / (total - warmup)
    return (1 - frac) + LR_END * frac


def lookahead_decays(t: int, total: int):
    """After step t (1-based): every 5 steps decay 0.95^5 (t/T)^3; at the last step, decay 1,
    which resets the net to the average and discards the steps since the previous update."""
    decays = []
    if t % LOOKAHEAD_EVERY == 0:
        decays.append(EMA_BASE**LOOKAHEAD_EVERY * (t / total) ** 3)
    if t == total:
        decays.append(1.0)
    return decays


def lookahead_tensors(net: Net):
    # Every float tensor of the state: parameters (frozen ones too) and BN running statistics,
    # as speedrun's lookahead covers its whole parameter arena and running statistics.
    return [v for v in net.state_dict().values() if v.is_floating_point()]


# ---- training ----

def train_step(net, opt, x, labels):
    loss = F.cross_entropy(net(x), labels, label_smoothing=LABEL_SMOOTHING, reduction="sum")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def crop_batch(padded_u8: torch.Tensor, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """32x32 crops of the reflect-padded images `idx` at independent uniform offsets in
    {-2..2}^2: speedrun's translation (reflect padding), drawn per image and epoch."""
    n = len(idx)
    dy = torch.randint(0, 2 * TRANSLATE + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * TRANSLATE + 1, (n,), generator=generator)
    ar = torch.arange(32)
    rows = (dy[:, None] + ar)[:, None, :, None]
    cols = (dx[:, None] + ar)[:, None, None, :]
    channels = torch.arange(3)[None, :, None, None]
    return padded_u8[idx[:, None, None, None], channels, rows, cols]


def tta_logits(net: Net, x_u8: torch.Tensor, fmt) -> torch.Tensor:
    """Level-2 TTA (src/run.rs tta_views): 1/4 the image, 1/4 its mirror, and 1/8 each of the
    one-pixel translations down-right and up-left (reflect padding) and their mirrors.
    Returns the TTA logits and those of the plain view."""
    x = normalise(x_u8)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    f = lambda v: net(v.contiguous(memory_format=fmt))  # noqa: E731
    plain = f(x)
    logits = 0.25 * plain + 0.25 * f(x.flip(3))
    for s in (padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]):
        logits += 0.125 * f(s) + 0.125 * f(s.flip(3))
    return logits, plain


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("target/test-data/cifar10"))
    ap.add_argument("--epochs", type=float, default=1.0, help="training epochs, fractions allowed (the recipe: 9.9; default 1)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke test; the schedule stays the full run's)")
    ap.add_argument("--test-limit", type=int, default=None, help="TTA on the first N test images only (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: os.cpu_count())")
    # channels_last (NHWC, as airbench and speedrun lay activations out) was about 20% faster
    # per training step than PyTorch's default NCHW in a quick check on a 2-core AMD EPYC
    # with torch 2.15: oneDNN then skips reordering every input and output.
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="run the network in the channels_last memory format (default; --no-channels-last for NCHW)")
    args = ap.parse_args()
    if not args.epochs > 0:
        sys.exit("error: --epochs must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = batches_dir(args.data_dir)
    train_u8, train_labels = load(TRAIN_FILES, folder)
    test_u8, test_labels = load([TEST_FILE], folder)
    if args.test_limit is not None:
        test_u8, test_labels = test_u8[: args.test_limit], test_labels[: args.test_limit]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    n_train = len(train_u8)
    steps_per_epoch = n_train // BATCH_SIZE  # drop_last: 48 at batch 1024
    total_steps = math.ceil(steps_per_epoch * args.epochs)  # 48 for 1 epoch, 476 for 9.9
    whiten_bias_steps = math.ceil(steps_per_epoch * WHITEN_BIAS_EPOCHS)  # 144
    run_steps = total_steps if args.max_steps is None else min(args.max_steps, total_steps)
    print(
        f"pytorch {torch.__version__}: airbench94, float32 on the CPU, {torch.get_num_threads()} threads; "
        f"{n_train} train / {len(test_u8)} test images; batch {BATCH_SIZE}; {run_steps} of {total_steps} steps",
        flush=True,
    )

    net = Net().to(memory_format=fmt)
    init_weights(net)

    # Untimed warm-up: one training step on a throwaway copy (with its own optimizer), and one
    # TTA chunk, so that first-call costs (oneDNN primitive creation, allocator growth) stay
    # off the clock; the network that is timed below is untouched.
    started = time.perf_counter()
    warm = copy.deepcopy(net)
    warm_opt = torch.optim.SGD(sgd_groups(warm, BATCH_SIZE), momentum=MOMENTUM, nesterov=True)
    warm_batch = normalise(train_u8[:BATCH_SIZE]).contiguous(memory_format=fmt)
    train_step(warm, warm_opt, warm_batch, train_labels[:BATCH_SIZE])
    warm.eval()
    with torch.no_grad():
        tta_logits(warm, test_u8[:TTA_CHUNK], fmt)
    del warm, warm_opt
    print(f"warm-up step (not counted): {time.perf_counter() - started:.2f} s", flush=True)

    opt = torch.optim.SGD(sgd_groups(net, BATCH_SIZE), momentum=MOMENTUM, nesterov=True)
    generator = torch.Generator().manual_seed(args.seed)

    # ---- the clock: whitening init + training + TTA ----
    t0 = time.perf_counter()
    init_whitening(net, train_u8)
    # The lookahead average starts from the whitened net (speedrun copies it after the init).
    ema = [v.detach().clone() for v in lookahead_tensors(net)]
    t_whiten = time.perf_counter()

    # Alternating flip: a fixed random half of the images is mirrored once; odd epochs
    # mirror every image, so each image alternates between its two orientations.
    flip = torch.rand(n_train, generator=generator) < 0.5
    base = torch.where(flip[:, None, None, None], train_u8.flip(3), train_u8)
    padded = F.pad(base, (TRANSLATE,) * 4, mode="reflect") if TRANSLATE else base
    net.train()
    step, losses = 0, []
    epochs = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(epochs):
        if step >= run_steps:
            break
        order = torch.randperm(n_train, generator=generator)
        for batch in range(min(steps_per_epoch, run_steps - step)):
            if step == whiten_bias_steps:
                net.whiten.bias.requires_grad_(False)  # frozen after 3 epochs (144 steps)
            mult = lr_multiplier(step, total_steps)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
            idx = order[batch * BATCH_SIZE : (batch + 1) * BATCH_SIZE]
            x_u8 = crop_batch(padded, idx, generator)
            if epoch % 2 == 1:
                x_u8 = x_u8.flip(3)
            x = normalise(x_u8).contiguous(memory_format=fmt)
            losses.append(train_step(net, opt, x, train_labels[idx]).detach())
            step += 1
            with torch.no_grad():
                for decay in lookahead_decays(step, total_steps):
                    for e, v in zip(ema, lookahead_tensors(net)):
                        e.lerp_(v, 1.0 - decay)
                        v.copy_(e)
    train_loss = torch.stack(losses).sum().item() / (step * BATCH_SIZE)
    t_train = time.perf_counter()

    net.eval()
    correct_tta = correct_plain = 0
    with torch.no_grad():
        for start in range(0, len(test_u8), TTA_CHUNK):
            labels = test_labels[start : start + TTA_CHUNK]
            logits, plain = tta_logits(net, test_u8[start : start + TTA_CHUNK], fmt)
            correct_tta += (logits.argmax(1) == labels).sum().item()
            # The plain view is one of the six: the no-TTA accuracy comes for free.
            correct_plain += (plain.argmax(1) == labels).sum().item()
    t_end = time.perf_counter()
    # ---- end of the clock ----

    result = dict(
        framework="pytorch",
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        channels_last=args.channels_last,
        epochs=args.epochs,
        steps=step,
        total_steps=total_steps,
        batch_size=BATCH_SIZE,
        train_images=n_train,
        test_images=len(test_u8),
        train_loss=train_loss,
        accuracy=correct_plain / len(test_u8),
        tta_accuracy=correct_tta / len(test_u8),
        whiten_seconds=t_whiten - t0,
        train_seconds=t_train - t_whiten,
        tta_seconds=t_end - t_train,
        time_seconds=t_end - t0,
        train_images_per_second=step * BATCH_SIZE / (t_train - t_whiten),
    )
    print(f"steps {step}, mean train loss {train_loss:.4f}")
    print(f"whitening: {result['whiten_seconds']:.2f} s")
    print(f"training:  {result['train_seconds']:.2f} s ({result['train_images_per_second']:.0f} train images/s)")
    print(f"TTA:       {result['tta_seconds']:.2f} s")
    print(f"total:     {result['time_seconds']:.2f} s")
    print(f"accuracy {result['accuracy']:.4f}, TTA accuracy {result['tta_accuracy']:.4f}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
