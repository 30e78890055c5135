"""The PyTorch side of ``sae-jax benchmark``: the seed workload as a PyTorch user
would write it (tensors on the device, manual minibatch slicing of a ``randperm``,
eager mode or ``torch.compile``), run by the benchmark in its own child process, on the
CPU or on CUDA (synchronized before every timer read, so a timer sees the work done).
"""

from __future__ import annotations

import math
import time
from itertools import pairwise

from sae_jax.cli.benchmark_report import BATCH, CLASSES, N_TEST, N_TRAIN, SIZES


def run_torch(
    data_dir: str,
    epochs: int,
    seed: int,
    compile_: bool,
    device: str = "cpu",
    precision: str = "default",
    n_train: int | None = None,
    n_test: int | None = None,
) -> dict:
    """The seed workload on ``device`` (``cpu`` or ``cuda``) for ``epochs`` per stage on
    the first ``n_train`` / ``n_test`` examples (default: all): ``{stages: {name:
    {epoch_s, wall_s}}, pipeline_s, accuracy}``. ``precision``: ``highest`` is full
    float32; ``default`` is TF32 on CUDA (as JAX's default there), PyTorch's default
    (float32) on the CPU."""
    import torch

    set_precision(precision, device)
    torch.manual_seed(seed)
    x, y, x_test, y_test = _torch_data(data_dir, device, n_train or N_TRAIN, n_test or N_TEST)
    start_all = clock(device)
    stages, encoders = _torch_pretrain(x, epochs, compile_)
    accuracy = _torch_finetune(encoders, x, y, x_test, y_test, epochs, compile_, stages)
    return {"stages": stages, "pipeline_s": clock(device) - start_all, "accuracy": accuracy}


def set_precision(precision: str, device: str) -> None:
    """Set PyTorch's float32 matrix-multiply precision (see ``run_torch``)."""
    import torch

    if precision == "highest":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    elif device == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.allow_tf32 = True


def clock(device: str) -> float:
    """``time.perf_counter()`` once the device has done all it was given."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _torch_data(data_dir: str, device: str, n_train: int, n_test: int) -> tuple:
    """The first examples of MNIST on ``device``: float32 ``[n, 784]`` in [0, 1] and
    int64 labels."""
    import numpy as np
    import torch

    from sae_jax.data import load_idx_dir

    m = load_idx_dir(data_dir)
    images = lambda a, n: torch.from_numpy(a[:n].reshape(n, -1).astype(np.float32) / 255)
    labels = lambda a, n: torch.from_numpy(a[:n].astype(np.int64))
    arrays = (
        images(m.train_images, n_train),
        labels(m.train_labels, n_train),
        images(m.test_images, n_test),
        labels(m.test_labels, n_test),
    )
    return tuple(a.to(device) for a in arrays)


def _uniform(*shape: int, fan_in: int, fan_out: int, device):
    import torch

    r = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(*shape, device=device).uniform_(-r, r).requires_grad_()


def _torch_train(opt, batch_loss, epochs: int, x, after_epoch=lambda: None) -> dict:
    """``epochs`` passes of shuffled minibatches of the ``len(x)`` examples, on ``x``'s
    device; ``batch_loss(idx)`` is one loss."""
    import torch

    n, device = len(x), x.device
    start, epoch_s = clock(device.type), []
    for _ in range(epochs):
        t = clock(device.type)
        perm = torch.randperm(n, device=device)
        for s in range(0, n, BATCH):
            loss = batch_loss(perm[s : s + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
        after_epoch()
        epoch_s.append(clock(device.type) - t)
    return {"epoch_s": epoch_s, "wall_s": clock(device.type) - start}


def _ae_loss(w, b, wd, bd, xb):
    import torch

    h = torch.sigmoid(xb @ w + b)
    r = torch.sigmoid(h @ wd + bd)
    rho_hat = h.mean(0).clamp(1e-6, 1 - 1e-6)
    kl = (0.1 * torch.log(0.1 / rho_hat) + 0.9 * torch.log(0.9 / (1 - rho_hat))).sum()
    return ((r - xb) ** 2).sum() + 3.0 * kl + 1e-4 * 0.5 * ((w**2).sum() + (wd**2).sum())


def _torch_pretrain(x, epochs: int, compile_: bool) -> tuple[dict, list]:
    """Greedy layer-wise pretraining of the sparse autoencoders (Adam 1e-3)."""
    import torch

    stages, data, encoders = {}, x, []
    for k, (i, o) in enumerate(pairwise(SIZES)):
        w, b = (
            _uniform(i, o, fan_in=i, fan_out=o, device=x.device),
            _uniform(o, fan_in=i, fan_out=o, device=x.device),
        )
        wd, bd = (
            _uniform(o, i, fan_in=o, fan_out=i, device=x.device),
            _uniform(i, fan_in=o, fan_out=i, device=x.device),
        )
        opt = torch.optim.Adam([w, b, wd, bd], lr=1e-3)
        loss_fn = torch.compile(_ae_loss) if compile_ else _ae_loss
        layer = (w, b, wd, bd)
        stages[f"pretrain_{k + 1}"] = _torch_train(
            opt, lambda idx, f=loss_fn, p=layer, d=data: f(*p, d[idx]), epochs, x
        )
        with torch.no_grad():
            data = torch.sigmoid(data @ w + b)
        encoders.append((w, b))
    return stages, encoders


def _classifier(params, xb):
    import torch

    h = xb
    for w, b in params[:-1]:
        h = torch.sigmoid(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def _torch_finetune(encoders, x, y, x_test, y_test, epochs, compile_, stages) -> float:
    """Fine-tuning with TF1-style RMSProp, the test accuracy after every epoch; adds
    the stage to ``stages`` and returns the last accuracy."""
    import torch

    head = (
        _uniform(SIZES[-1], CLASSES, fan_in=SIZES[-1], fan_out=CLASSES, device=x.device),
        _uniform(CLASSES, fan_in=SIZES[-1], fan_out=CLASSES, device=x.device),
    )
    params = [*encoders, head]
    flat = [p for pair in params for p in pair]
    opt = torch.optim.RMSprop(flat, lr=1e-3, alpha=0.9, eps=1e-10)
    for p in flat:  # TF1 starts the mean square at 1
        opt.state[p] = {"step": torch.tensor(0.0), "square_avg": torch.ones_like(p)}
    forward = torch.compile(_classifier) if compile_ else _classifier
    test: dict[str, float] = {}

    def measure() -> None:
        with torch.no_grad():
            test["accuracy"] = (forward(params, x_test).argmax(1) == y_test).float().mean().item()

    stages["finetune"] = _torch_train(
        opt,
        lambda idx: torch.nn.functional.cross_entropy(forward(params, x[idx]), y[idx]),
        epochs,
        x,
        measure,
    )
    return test["accuracy"]
