"""MobileNetV2 with SCSA on the hidden width of every inverted residual: after the depthwise
3x3 conv + BN + ReLU6, before the linear 1x1 projection."""
import torch.nn as nn

from .common import attention, init_convs

# (expansion t, output channels c, repeats n, first stride s), as in the paper
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))


def _divisible(v, d=8):
    """Round channels to a multiple of 8 (never below 90% of v), as the reference implementation."""
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t, attention):
        super().__init__()
        hidden = cin * t
        self.expand = _conv_bn(cin, hidden, 1) if t != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.scsa = attention(hidden)
        self.project = _conv_bn(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.scsa(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, attention, num_classes=1000, width_mult=1.0):
        super().__init__()
        cin = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        blocks = [_conv_bn(3, cin, 3, 2)]
        for t, c, n, s in SETTINGS:
            cout = _divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, attention))
                cin = cout
        blocks.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        init_convs(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v2(scsa=True, backend="auto", num_classes=1000, width_mult=1.0, **scsa_kwargs):
    """SCSA-MobileNetV2 (`scsa=False`: plain MobileNetV2); hidden widths 32..960 at width_mult=1.
    `scsa_kwargs` go to every SCSA (head_num, window_size, ...)."""
    return MobileNetV2(attention(scsa, backend, scsa_kwargs), num_classes, width_mult)
