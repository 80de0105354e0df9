"""Reader properties that estimators rely on: column layout and per-step metadata."""

import torch
from torch import nn

from influence_hooks import GradientRecorder, open_run


def _record(tmp_path, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none")
    for t in range(steps):
        ids = torch.arange(4) + 10 * t
        rec.begin_micro_batch(ids.flip(0))
        nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return model, open_run(tmp_path / "run")


def test_layer_param_shapes_follow_the_row_column_order(tmp_path):
    model, run = _record(tmp_path)
    for info, (name, module) in zip(run.layers, [("0", model[0]), ("2", model[2])]):
        assert info.name == name
        own = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)]
        assert list(info.param_shapes.items()) == own  # weight before bias, as in each row
        assert info.grad_dim == sum(p.numel() for p in module.parameters(recurse=False))


def test_step_sample_ids_equal_the_ids_given_in_batch_order(tmp_path):
    _, run = _record(tmp_path)
    for t in range(3):
        expected = (torch.arange(4) + 10 * t).flip(0).tolist()
        assert run.step_sample_ids(t).tolist() == expected
        assert next(run.iter_steps((t, t + 1))).sample_ids.tolist() == expected
