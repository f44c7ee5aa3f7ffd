"""A tiny CNN registered as model ``tiny``, for runs whose behaviour does not depend on ResNet18's size.

It has what the recipes need of a model: a 64-filter 3x3 stem (whitening init), BatchNorm, conv filters for
Muon and a dropout slot. Imported by conftest (in-process tests) and tiny_cli.py (subprocess runs)."""
import torch
from torch import nn

from eva_api.models import MODELS


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.linear(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


MODELS.setdefault("tiny", TinyResNet)
