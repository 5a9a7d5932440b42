"""ak.SOURCE refuses bad arguments before any pass over the data, naming the argument and the fix."""
import math

import pytest
import torch
import torch.nn as nn

import attrkernels as ak

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def setup(checkpoints=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(0)
    train = [(torch.randn(8, 2, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    states = []
    for _ in range(checkpoints):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, ak.tasks.Classification(), train, states


@pytest.mark.parametrize("lr_sums,match", [
    (None, r"lr_sums is missing.*checkpoints \[0, 1, 2, 3\] carry none"),
    ([0.1, 0.0, 0.1, 0.1], r"lr_sums\[1\] must be a finite number > 0"),
    ([0.1, -1.0, 0.1, 0.1], r"lr_sums\[1\] must be a finite number > 0"),
    ([0.1, math.nan, 0.1, 0.1], r"lr_sums\[1\] must be a finite number > 0"),
    ([0.1, 0.1, 0.1], r"lr_sums must hold one number per checkpoint: got 3 for 4 checkpoints"),
    (0.1, r"lr_sums must hold one number per checkpoint \(4\)"),
])
def test_bad_lr_sums_are_refused_naming_lr_sums(lr_sums, match):
    model, task, train, states = setup()
    with pytest.raises(ValueError, match=match):
        ak.SOURCE(model, task, segments=2, verbose=False).fit(train, states, lr_sums)


def test_checkpoint_objects_carry_their_lr_sums_and_one_without_is_named():
    model, task, train, states = setup()
    ckpts = [ak.tasks.Checkpoint(s, epoch=i, lr=0.1, lr_sum=0.5, steps=5) for i, s in enumerate(states)]
    m = ak.SOURCE(model, task, segments=2, verbose=False).fit(train, ckpts)
    assert [seg.time for seg in m.fitted_segments] == [1.0, 1.0]
    ckpts[2] = ak.tasks.Checkpoint(states[2], epoch=2, lr=0.1)
    with pytest.raises(ValueError, match=r"lr_sums is missing.*checkpoints \[2\] carry none"):
        ak.SOURCE(model, task, segments=2, verbose=False).fit(train, ckpts)


def test_segments_and_checkpoints_must_fit_together():
    model, task, train, states = setup(checkpoints=5)
    with pytest.raises(ValueError, match=r"checkpoints holds 2 checkpoint\(s\), fewer than segments=3"):
        ak.SOURCE(model, task, segments=3, verbose=False).fit(train, states[:2], [0.1] * 2)
    with pytest.raises(ValueError, match=r"checkpoints holds 5 checkpoints, not divisible by segments=3"):
        ak.SOURCE(model, task, segments=3, verbose=False).fit(train, states, [0.1] * 5)
    with pytest.raises(ValueError, match="checkpoints must be a list"):
        ak.SOURCE(model, task, segments=1, verbose=False).fit(train, None, [0.1])
    with pytest.raises(ValueError, match="segments must be a positive int"):
        ak.SOURCE(model, task, segments=0)


def test_checkpoints_of_another_model_are_refused_before_any_pass():
    model, task, train, states = setup()
    other = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).state_dict()
    with pytest.raises(ValueError, match=r"checkpoints: checkpoint 3 does not match the model: shape mismatches"):
        ak.SOURCE(model, task, segments=2, verbose=False).fit(train, states[:3] + [other], [0.1] * 4)


def test_bad_settings_and_order_of_calls():
    model, task, train, states = setup()
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        ak.SOURCE(model, task, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay must be"):
        ak.SOURCE(model, task, weight_decay=-0.1)
    with pytest.raises(ValueError, match="fisher must be one of"):
        ak.SOURCE(model, task, fisher="exact")
    with pytest.raises(RuntimeError, match=r"call SOURCE.fit\(train, checkpoints, lr_sums\) before scoring"):
        ak.SOURCE(model, task, verbose=False).score(train, train=train)


def test_shuffled_loader_nan_weights_and_a_live_state_dict():
    from torch.utils.data import DataLoader, TensorDataset
    model, task, train, states = setup()
    x, y = train[0]
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffles"):
        ak.SOURCE(model, task, segments=2, verbose=False).fit(shuffled, states, [0.1] * 4)
    bad = [dict(s) for s in states]
    bad[2] = {k: v.clone() for k, v in bad[2].items()}
    next(iter(bad[2].values()))[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"checkpoint 2: .* NaN or Inf"):
        ak.SOURCE(model, task, segments=2, verbose=False).fit(train, bad, [0.1] * 4)
    live = states[:3] + [model.state_dict()]  # the caller's live tensors, changed after fit
    m = ak.SOURCE(model, task, segments=2, verbose=False).fit(train, live, [0.1] * 4)
    before = m.score(train)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(m.score(train), before)
