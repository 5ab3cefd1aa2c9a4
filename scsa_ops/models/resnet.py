"""ResNet-50/101 (v1.5: the stride on the 3x3 conv) with SCSA after the 3x3 conv + BN + ReLU of
every bottleneck, where the official ResNet-SCSA places it."""
from typing import Sequence

import torch.nn as nn

from .common import attention, init_convs


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, width, stride, attention):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.scsa = attention(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.scsa(self.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int], attention, num_classes=1000, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, inplanes = [], width
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, width * 2 ** i, 2 if i > 0 and j == 0 else 1, attention))
                inplanes = width * 2 ** i * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_convs(self)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet50(scsa=True, backend="auto", num_classes=1000, width=64, **scsa_kwargs):
    """SCSA-ResNet-50 (`scsa=False`: plain ResNet-50). `width`: channels of the stem and of the
    first stage's 3x3 convs, every stage scales with it (64: the standard network). `scsa_kwargs`
    go to every SCSA (head_num, window_size, ...)."""
    return ResNet((3, 4, 6, 3), attention(scsa, backend, scsa_kwargs), num_classes, width)


def resnet101(scsa=True, backend="auto", num_classes=1000, width=64, **scsa_kwargs):
    """SCSA-ResNet-101; arguments as resnet50."""
    return ResNet((3, 4, 23, 3), attention(scsa, backend, scsa_kwargs), num_classes, width)
