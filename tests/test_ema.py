import pytest
import torch
from torch import nn

from eva_api import EMA, ConfigError, make_config


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
