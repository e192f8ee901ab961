"""Shared fixtures. Tests run on the CPU with tiny models built from configs; the few that
need the packaged default weights use `default_weights` (converted once per machine into
VISTUNE_HOME, then reused)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_weights():
    """Paths of the converted packaged weights (SmolLM2-135M-Instruct, DINOv2 ViT-S/14)."""
    from vistune.weights import ensure_default_weights

    return ensure_default_weights()
