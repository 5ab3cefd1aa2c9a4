"""A look-alike of the official SCSA class (HZAI-ZJNU/SCSA, mmpretrain/models/attentions/SCSA.py),
written for the tests from its published structure: the same attributes, submodules and parameter
names, the same forward (plain torch in place of einops, nn.Module in place of mmengine's
BaseModule). What `scsa_ops.convert` has to recognise in users' models."""
import torch
import torch.nn as nn


class OfficialSCSA(nn.Module):
    def __init__(self, dim, head_num, window_size=7, group_kernel_sizes=(3, 5, 7, 9), qkv_bias=False,
                 fuse_bn=False, norm_cfg=None, act_cfg=None, down_sample_mode="avg_pool", attn_drop_ratio=0.0,
                 gate_layer="sigmoid"):
        super().__init__()
        self.dim = dim
        self.head_num = head_num
        self.head_dim = dim // head_num
        self.scaler = self.head_dim ** -0.5
        self.group_kernel_sizes = list(group_kernel_sizes)
        self.window_size = window_size
        self.qkv_bias = qkv_bias
        self.fuse_bn = fuse_bn
        self.down_sample_mode = down_sample_mode
        self.group_chans = g = dim // 4
        ks = group_kernel_sizes
        self.local_dwc = nn.Conv1d(g, g, kernel_size=ks[0], padding=ks[0] // 2, groups=g)
        self.global_dwc_s = nn.Conv1d(g, g, kernel_size=ks[1], padding=ks[1] // 2, groups=g)
        self.global_dwc_m = nn.Conv1d(g, g, kernel_size=ks[2], padding=ks[2] // 2, groups=g)
        self.global_dwc_l = nn.Conv1d(g, g, kernel_size=ks[3], padding=ks[3] // 2, groups=g)
        self.sa_gate = nn.Softmax(dim=2) if gate_layer == "softmax" else nn.Sigmoid()
        self.norm_h = nn.GroupNorm(4, dim)
        self.norm_w = nn.GroupNorm(4, dim)
        self.conv_d = nn.Identity()
        self.norm = nn.GroupNorm(1, dim)
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, groups=dim)
        self.k = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, groups=dim)
        self.v = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop_ratio)
        self.ca_gate = nn.Softmax(dim=1) if gate_layer == "softmax" else nn.Sigmoid()
        if window_size == -1:
            self.down_func = nn.AdaptiveAvgPool2d((1, 1))
        elif down_sample_mode == "avg_pool":
            self.down_func = nn.AvgPool2d(kernel_size=(window_size, window_size), stride=window_size)
        elif down_sample_mode == "max_pool":
            self.down_func = nn.MaxPool2d(kernel_size=(window_size, window_size), stride=window_size)

    def _spatial(self, p, norm):
        parts = torch.split(p, self.group_chans, dim=1)
        convs = (self.local_dwc, self.global_dwc_s, self.global_dwc_m, self.global_dwc_l)
        return self.sa_gate(norm(torch.cat([conv(part) for conv, part in zip(convs, parts)], dim=1)))

    def forward(self, x):
        b, c, h_, w_ = x.size()
        x_h_attn = self._spatial(x.mean(dim=3), self.norm_h).view(b, c, h_, 1)
        x_w_attn = self._spatial(x.mean(dim=2), self.norm_w).view(b, c, 1, w_)
        x = x * x_h_attn * x_w_attn
        y = self.conv_d(self.down_func(x))
        _, _, h_, w_ = y.size()
        y = self.norm(y)
        q, k, v = (t.reshape(b, self.head_num, self.head_dim, h_ * w_) for t in (self.q(y), self.k(y), self.v(y)))
        attn = q @ k.transpose(-2, -1) * self.scaler
        attn = self.attn_drop(attn.softmax(dim=-1))
        attn = (attn @ v).reshape(b, c, h_, w_).mean((2, 3), keepdim=True)
        return self.ca_gate(attn) * x
