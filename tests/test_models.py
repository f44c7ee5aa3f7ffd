import pytest
import torch

from eva_api import ConfigError, ResNet18, ResNet34, count_parameters, get_model


def test_resnet18_has_exactly_the_cifar_parameter_count():
    assert count_parameters(ResNet18()) == 11_173_962


def test_dropout_adds_no_parameters():
    assert count_parameters(ResNet18(dropout=0.3)) == 11_173_962


def test_layout_is_kuangliu_cifar():
    m = ResNet18()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert [len(l) for l in (m.layer1, m.layer2, m.layer3, m.layer4)] == [2, 2, 2, 2]
    assert [l[0].conv1.stride[0] for l in (m.layer1, m.layer2, m.layer3, m.layer4)] == [1, 2, 2, 2]
    assert (m.linear.in_features, m.linear.out_features) == (512, 10)
    assert len(m.layer2[0].shortcut) == 2 and len(m.layer1[0].shortcut) == 0  # 1x1 conv + BN projection


@pytest.mark.parametrize("name,blocks", [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])])
def test_get_model_by_name_and_output_shape(name, blocks):
    m = get_model(name, num_classes=7).eval()
    assert [len(l) for l in (m.layer1, m.layer2, m.layer3, m.layer4)] == blocks
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def test_resnet34_count():
    assert count_parameters(ResNet34()) == 21_282_122


def test_unknown_model_is_refused():
    with pytest.raises(ConfigError, match="resnet18"):
        get_model("vgg")
