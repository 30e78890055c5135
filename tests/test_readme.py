"""The README's example of sae_jax.losses in someone else's training step runs as shown."""

import re

import numpy as np
from conftest import REPO


def test_losses_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    example = next(b for b in blocks if "def train_step" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["params"]["w"].shape == (784, 256)
