import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdml.analysis import perturbed_loss, posterior_entropy


def _data(n: int = 300, features: int = 6, classes: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(classes, (n,), generator=generator)
    return x, y


def _logistic_regression(x: torch.Tensor, y: torch.Tensor) -> nn.Linear:
    """Trained to its optimum: CE of a linear model is convex in its parameters."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-2 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def test_entropy_of_a_uniform_posterior_is_log_classes():
    model = nn.Linear(5, 7)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x, y = _data(features=5, classes=7)
    assert posterior_entropy(model, (x, y)) == pytest.approx(math.log(7), rel=1e-6)


def test_entropy_is_the_mean_over_every_batch_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    x, y = _data()
    with torch.no_grad():
        logp = model.eval()(x).log_softmax(1)
    expected = float(-(logp.exp() * logp).sum(1).mean())
    model.train()
    assert posterior_entropy(model, (x, y), batch_size=64) == pytest.approx(expected, rel=1e-6)
    assert model.training  # left as it was
    batches = [(x[i : i + 50],) for i in range(0, len(x), 50)]  # inputs only
    assert posterior_entropy(model, batches) == pytest.approx(expected, rel=1e-6)


def test_no_noise_gives_the_clean_loss_and_the_weights_come_back_exactly():
    x, y = _data()
    model = _logistic_regression(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    losses = perturbed_loss(model, (x, y), [0.0, 0.1, 1.0], draws=3, batch_size=128)
    assert losses.shape == (3, 3) and losses.dtype == torch.float64
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
    torch.testing.assert_close(losses[0], torch.full((3,), clean, dtype=torch.float64))
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    assert len(set(losses[2].tolist())) == 3  # each draw is its own noise


def test_at_a_minimum_the_loss_rises_with_the_noise_along_every_draw():
    x, y = _data()
    model = _logistic_regression(x, y)
    sigmas = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0]
    losses = perturbed_loss(model, (x, y), sigmas, draws=4)
    # convex along each noise direction, with its minimum at sigma = 0: never decreasing
    assert (losses.diff(dim=0) > 0).all()


def test_the_same_function_with_smaller_weights_is_a_sharper_minimum():
    x, y = _data()
    model = _logistic_regression(x, y)
    scaled = nn.Linear(x.shape[1], model.out_features)  # the same function of 10x the inputs
    with torch.no_grad():
        scaled.weight.copy_(model.weight / 10)
        scaled.bias.copy_(model.bias)
    sigmas = [0.0, 0.3]
    rise = perturbed_loss(model, (x, y), sigmas).diff(dim=0)
    scaled_rise = perturbed_loss(scaled, (10 * x, y), sigmas).diff(dim=0)
    assert (scaled_rise > rise).all()  # the same weight noise moves its logits 10x as far


def test_the_noise_reaches_every_parameter_and_repeats_with_the_seed():
    model = nn.Linear(3, 5)
    x, y = torch.zeros(40, 3), torch.arange(40) % 5  # the logits are the bias alone
    first = perturbed_loss(model, (x, y), [0.0, 0.5], draws=2, seed=7)
    assert (first[1] != first[0]).all()
    torch.testing.assert_close(perturbed_loss(model, (x, y), [0.0, 0.5], draws=2, seed=7), first)
    assert not torch.equal(perturbed_loss(model, (x, y), [0.5], draws=2, seed=8), first[1:])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sigmas": [-0.1]}, "sigmas must be finite"),
        ({"sigmas": []}, "sigmas must be finite"),
        ({"sigmas": [float("nan")]}, "sigmas must be finite"),
        ({"sigmas": [0.1], "draws": 0}, "draws must be >= 1"),
    ],
)
def test_bad_perturbation_arguments(options, message):
    x, y = _data()
    with pytest.raises(ValueError, match=message):
        perturbed_loss(nn.Linear(6, 4), (x, y), **options)


def test_bad_data():
    model = nn.Linear(6, 4)
    x, _ = _data()
    with pytest.raises(ValueError, match="needs targets"):
        perturbed_loss(model, [(x,)], [0.1])
    with pytest.raises(ValueError, match="no batches"):
        posterior_entropy(model, iter(()))
    with pytest.raises(ValueError, match="no parameters"):
        perturbed_loss(nn.ReLU(), [(x,)], [0.1])
