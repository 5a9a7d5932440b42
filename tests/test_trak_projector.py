"""SketchProjector: traker's projector interface over our sketch."""
import numpy as np
import pytest
import torch

import attrkernels as ak
from attrkernels.kernels.philox import derive_seed


def test_dict_input_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(4, 3, 5, generator=g), "b": torch.randn(4, 3, generator=g),
             "v": torch.randn(4, 7, 2, generator=g)}
    flat = torch.cat([v.reshape(4, -1) for v in grads.values()], dim=1)
    proj = ak.SketchProjector(flat.shape[1], 32, seed=3, proj_type="normal")
    want = ak.sketch(flat, 32, seed=derive_seed(3, 5), kind="gaussian")
    assert torch.allclose(proj.project(grads, model_id=5), want, rtol=0, atol=1e-6)
    assert torch.allclose(proj.project(flat, model_id=5), want, rtol=0, atol=1e-6)
    assert not torch.allclose(proj.project(flat, model_id=6), want)


def test_bad_input():
    proj = ak.SketchProjector(10, 4)
    with pytest.raises(ValueError, match=r"grads must have shape \[B, 10\]"):
        proj.project(torch.randn(2, 11), 0)
    with pytest.raises(ValueError, match="proj_type"):
        ak.SketchProjector(10, 4, proj_type="uniform")


def test_traker_uses_our_projector(tmp_path):
    trak = pytest.importorskip("trak")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(20, 10), torch.randint(0, 3, (20,))
    n_params = sum(p.numel() for p in model.parameters())
    proj = ak.SketchProjector(n_params, 64, seed=1)
    traker = trak.TRAKer(model=model, task="image_classification", train_set_size=20,
                         save_dir=str(tmp_path), device="cpu", projector=proj,
                         use_half_precision=False)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=(x[:10], y[:10]), num_samples=10)
    stored = np.asarray(traker.saver.current_store["grads"][:10])
    grads = traker.gradient_computer.compute_per_sample_grad(batch=(x[:10], y[:10]))
    ours = proj.project(grads, 0).numpy() / float(traker.normalize_factor)  # traker divides by sqrt(p)
    assert np.abs(stored - ours).max() < 1e-6
