import pytest
import torch
from torch import nn

from eva_api import EMA, ConfigError, Lookahead, make_config


def test_ema_moves_weights_and_bn_statistics_a_fraction_towards_the_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3) * 5 + 2)  # training mode: BN running stats and batch counter move
    ema.update(model)
    now, target = ema.state_dict(), model.state_dict()
    for k, v in now.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * before[k] + 0.25 * target[k]), k
    assert now["1.num_batches_tracked"] == 0  # integer buffers are not averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_ema_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(2, 2), decay)


def test_config_ema_is_off_by_default_and_validated():
    assert make_config("fast").ema == 0.0
    with pytest.raises(ConfigError, match="ema"):
        make_config("fast", ema=1.0)


def _nudge(model: nn.Module) -> None:
    """Stands in for an optimizer step: every parameter +1, BN statistics moved by a training batch."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3) * 5 + 2)


def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_lookahead_pulls_the_model_to_the_slow_weights_every_k_steps_and_at_the_end():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    la = Lookahead(model, every=2, total_steps=5)
    slow = _floats(model)
    for step in range(1, 6):
        _nudge(model)
        fast = _floats(model)
        la.update(model)
        now = _floats(model)
        if step % 2:  # steps 1, 3: the model runs free; step 5 (the last) takes the slow weights as they are
            expect = slow if step == 5 else fast
        else:  # steps 2, 4: slow moves 1 - a towards the model, a = 0.95**2 * (step/5)**3, and the model copies it
            a = 0.95 ** 2 * (step / 5) ** 3
            slow = {k: a * slow[k] + (1 - a) * fast[k] for k in slow}
            expect = slow
        for k in expect:
            assert torch.allclose(now[k], expect[k]), (step, k)
    assert la.state_dict()["steps"] == 5


def test_lookahead_state_round_trips_and_config_validates():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    la = Lookahead(model, every=1, total_steps=10)
    _nudge(model)
    la.update(model)
    again = Lookahead(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), every=1, total_steps=10)
    again.load_state_dict(la.state_dict())
    assert again.steps == 1 and all(torch.equal(again.slow[k], v) for k, v in la.slow.items())
    with pytest.raises(ValueError, match="lookahead"):
        Lookahead(model, every=0, total_steps=10)
    assert make_config("fast").lookahead == 0
    with pytest.raises(ConfigError, match="lookahead"):
        make_config("fast", lookahead=-1)
