"""PyTorch mirrors of ssl_us.models (ResNet-18, ConvNet4, MLPHead) and of the SimCLR step.

Same architecture, padding, parameter shapes and loss as the Flax modules, so that the benchmark
compares the same computation:
- Flax 'SAME' padding puts the extra row/column of a strided window at the bottom/right (for a
  3x3/2 conv or pool on an even input: pad (0, 1)), unlike PyTorch's symmetric ``padding=1``;
  the mirrors pad explicitly with ``F.pad`` where the two differ (stride-2 3x3 convs, the 3x3/2
  max-pool with -inf), and use PyTorch's own padding where they agree.
- BatchNorm: momentum 0.1 (= Flax 0.9), eps 1e-5, batch statistics in training mode; the last
  BatchNorm of every residual block starts with scale 0 (Flax ``scale_init=zeros``).
- Tensors are NCHW; ``load_flax`` copies Flax parameters (HWIO kernels, (in, out) dense
  weights, NHWC flatten order) into a mirror, which lets the benchmark check that both
  frameworks compute the same loss.
- The step is SimCLR's: forward of the 2N views in one batch, NT-Xent (the same formulation as
  ssl_us.losses.nt_xent: self-similarities masked with -1e9), backward, Adam with L2 weight
  decay on conv/dense kernels only (ssl_us.train.make_optimizer's 'adam').
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_MASK = -1e9


def _bn(c: int, zero_scale: bool = False) -> nn.BatchNorm2d:
  bn = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
  if zero_scale:
    nn.init.zeros_(bn.weight)
  return bn


class SameConv2d(nn.Module):
  """k x k convolution (k odd), no bias; ``padding`` an int pads symmetrically (the stem's 3).

  Without ``padding``: Flax/XLA 'SAME' for stride 1, or stride 2 on an even input. Stride 1
  pads (k-1)/2 each side (PyTorch's own padding); stride 2 pads k - 2 in total, low
  (k-2)//2 and high the rest (lax.padtype_to_pads), e.g. (0, 1) for 3x3; 1x1/2 pads nothing.
  """

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding=None):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, bias=False,
                          padding=0 if padding is None and stride > 1 else
                          (k - 1) // 2 if padding is None else padding)
    self.pad = None
    if padding is None and stride == 2 and k > 1:
      total = k - 2
      self.pad = (total // 2, total - total // 2) * 2  # (left, right, top, bottom)

  def forward(self, x):
    if self.pad is not None:
      x = F.pad(x, self.pad)
    return self.conv(x)


class BasicBlock(nn.Module):
  """models.ResNetBlock: conv3x3(s)-BN-ReLU-conv3x3-BN(scale 0) + [1x1(s)-BN] -> ReLU."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = SameConv2d(cin, cout, 3, stride)
    self.bn1 = _bn(cout)
    self.conv2 = SameConv2d(cout, cout, 3)
    self.bn2 = _bn(cout, zero_scale=True)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = SameConv2d(cin, cout, 1, stride)
      self.bn_proj = _bn(cout)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    r = x if self.proj is None else self.bn_proj(self.proj(x))
    return F.relu(r + y)


class ResNet18(nn.Module):
  """models.ResNet18 (7x7/2 stem, padding 3, BN, ReLU, 3x3/2 SAME max-pool, 4 stages of 2)."""

  def __init__(self, in_channels: int = 1, width: int = 64):
    super().__init__()
    self.stem = SameConv2d(in_channels, width, 7, 2, padding=3)
    self.bn_stem = _bn(width)
    blocks, cin = [], width
    for i in range(4):
      for j in range(2):
        cout = width * 2**i
        blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.out_dim = cin

  def forward(self, x):
    x = F.relu(self.bn_stem(self.stem(x)))
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-float("inf")), 3, 2)  # Flax 3x3/2 SAME
    return self.blocks(x).mean(dim=(2, 3))


class Bottleneck(nn.Module):
  """models.BottleneckResNetBlock: 1x1-BN-ReLU-3x3(s)-BN-ReLU-1x1(4f)-BN(scale 0)
  + [1x1(s)-BN] -> ReLU."""

  def __init__(self, cin: int, filters: int, stride: int):
    super().__init__()
    cout = 4 * filters
    self.conv1, self.bn1 = SameConv2d(cin, filters, 1), _bn(filters)
    self.conv2, self.bn2 = SameConv2d(filters, filters, 3, stride), _bn(filters)
    self.conv3, self.bn3 = SameConv2d(filters, cout, 1), _bn(cout, zero_scale=True)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj, self.bn_proj = SameConv2d(cin, cout, 1, stride), _bn(cout)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    r = x if self.proj is None else self.bn_proj(self.proj(x))
    return F.relu(r + y)


class ResNet50(nn.Module):
  """models.ResNet50: the ResNet18 stem, bottleneck stages of (3, 4, 6, 3); 2048-d output."""

  def __init__(self, in_channels: int = 1, width: int = 64):
    super().__init__()
    self.stem = SameConv2d(in_channels, width, 7, 2, padding=3)
    self.bn_stem = _bn(width)
    blocks, cin = [], width
    for i, n in enumerate((3, 4, 6, 3)):
      for j in range(n):
        blocks.append(Bottleneck(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = 4 * width * 2**i
    self.blocks = nn.Sequential(*blocks)
    self.out_dim = cin

  def forward(self, x):
    x = F.relu(self.bn_stem(self.stem(x)))
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-float("inf")), 3, 2)
    return self.blocks(x).mean(dim=(2, 3))


def _conv3d_bn(cin: int, cout: int, k: int, stride=1) -> nn.Sequential:
  """Conv3d (no bias, padding k // 2: the FLOPs of Flax's SAME) - BN - LeakyReLU(0.1)."""
  return nn.Sequential(nn.Conv3d(cin, cout, k, stride, padding=k // 2, bias=False),
                       nn.BatchNorm3d(cout, eps=1e-5, momentum=0.1), nn.LeakyReLU(0.1))


class DarknetBlock3D(nn.Module):
  """models3d.DarknetBlock3D: x + [1x1x1 (c/2) - 3x3x3 (c)], each conv-BN-LeakyReLU."""

  def __init__(self, c: int):
    super().__init__()
    self.body = nn.Sequential(_conv3d_bn(c, max(c // 2, 1), 1), _conv3d_bn(max(c // 2, 1), c, 3))

  def forward(self, x):
    return x + self.body(x)


class Darknet53_3D(nn.Module):
  """models3d.Darknet53_3D on (N, C, T, H, W): stem, five stages each opened by a 3x3x3
  convolution of stride (t_s, 2, 2), blocks (1, 2, 8, 8, 4); a timing mirror (same layers and
  FLOPs; symmetric padding where Flax's SAME pads a strided window at the end)."""

  def __init__(self, in_channels: int = 1, width: int = 32,
               stage_sizes=(1, 2, 8, 8, 4), temporal_strides=(1, 1, 2, 2, 2)):
    super().__init__()
    layers, c = [_conv3d_bn(in_channels, width, 3)], width
    for i, (n, ts) in enumerate(zip(stage_sizes, temporal_strides)):
      f = width * 2 ** (i + 1)
      layers.append(_conv3d_bn(c, f, 3, (ts, 2, 2)))
      layers += [DarknetBlock3D(f) for _ in range(n)]
      c = f
    self.body = nn.Sequential(*layers)
    self.out_dim = c

  def forward(self, x):
    return self.body(x).mean(dim=(2, 3, 4))


class ConvNet4(nn.Module):
  """models.ConvNet4: [conv3x3-BN-ReLU] x2, 2x2 pool, [conv3x3(2w)-BN-ReLU] x2, pool, dropout,
  flatten in NHWC order (as Flax), so the representation and the head's weights line up."""

  def __init__(self, in_channels: int = 1, width: int = 32, dropout_rate: float = 0.2):
    super().__init__()
    widths = (width, width, 2 * width, 2 * width)
    cins = (in_channels,) + widths[:-1]
    self.convs = nn.ModuleList(SameConv2d(a, b, 3) for a, b in zip(cins, widths))
    self.bns = nn.ModuleList(_bn(b) for b in widths)
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, x):
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = F.relu(bn(conv(x)))
      if i % 2 == 1:
        x = F.max_pool2d(x, 2, 2)
    x = self.dropout(x)
    return x.permute(0, 2, 3, 1).flatten(1)


class MLPHead(nn.Module):
  """models.MLPHead with one hidden layer: Dense(no bias)-BN-ReLU-Dense(bias)."""

  def __init__(self, cin: int, hidden: int, out: int):
    super().__init__()
    self.fc1 = nn.Linear(cin, hidden, bias=False)
    self.bn = nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1)
    self.fc2 = nn.Linear(hidden, out)

  def forward(self, h):
    return self.fc2(F.relu(self.bn(self.fc1(h))))


class Contrastive(nn.Module):
  """encoder -> head, as models.ContrastiveModel; returns z."""

  def __init__(self, encoder: nn.Module, head: nn.Module):
    super().__init__()
    self.encoder, self.head = encoder, head

  def forward(self, x):
    return self.head(self.encoder(x))


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
  """ssl_us.losses.nt_xent on one device: mean over 2N anchors of logsumexp - positive."""
  a = F.normalize(torch.cat([z_a, z_b]), dim=1, eps=1e-6)
  n2 = a.shape[0]
  logits = a @ a.T / temperature
  logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool), _MASK)
  pos = torch.arange(n2).roll(n2 // 2)
  return F.cross_entropy(logits, pos)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
  """Adam with L2 decay on conv/dense kernels only (ssl_us.train.decay_mask's rule)."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.Adam([{"params": decay, "weight_decay": weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=lr)


def train_step(model, opt, views: torch.Tensor, temperature: float,
               autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
  """One SimCLR step on the 2N views [x_a; x_b] (NCHW); returns the loss."""
  opt.zero_grad(set_to_none=True)
  with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                      enabled=autocast_dtype is not None):
    z = model(views)
  z_a, z_b = z.float().chunk(2)
  loss = nt_xent(z_a, z_b, temperature)
  loss.backward()
  opt.step()
  return loss.detach()


# ----------------------------------------------------------------------------------------------
# Loading Flax parameters (for the equivalence check).


def _t(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, dtype=np.float32))


def _conv(dst: SameConv2d, kernel):
  dst.conv.weight.data.copy_(_t(kernel).permute(3, 2, 0, 1))  # HWIO -> OIHW


def _norm(dst, params, stats):
  dst.weight.data.copy_(_t(params["scale"]))
  dst.bias.data.copy_(_t(params["bias"]))
  dst.running_mean.copy_(_t(stats["mean"]))
  dst.running_var.copy_(_t(stats["var"]))


def load_flax(model: Contrastive, params, batch_stats):
  """Copies a Flax ContrastiveModel's variables (params, batch_stats) into the mirror.

  Kernels go HWIO -> OIHW and (in, out) -> (out, in); ConvNet4's mirror flattens NHWC like
  Flax, so the head's first weight needs no permutation.
  """
  pe, se = params["encoder"], batch_stats["encoder"]
  enc = model.encoder
  if isinstance(enc, ResNet18):
    _conv(enc.stem, pe["conv_init"]["kernel"])
    _norm(enc.bn_stem, pe["bn_init"], se["bn_init"])
    for b, block in enumerate(enc.blocks):
      p, s = pe[f"ResNetBlock_{b}"], se[f"ResNetBlock_{b}"]
      _conv(block.conv1, p["Conv_0"]["kernel"])
      _conv(block.conv2, p["Conv_1"]["kernel"])
      _norm(block.bn1, p["BatchNorm_0"], s["BatchNorm_0"])
      _norm(block.bn2, p["BatchNorm_1"], s["BatchNorm_1"])
      if block.proj is not None:
        _conv(block.proj, p["conv_proj"]["kernel"])
        _norm(block.bn_proj, p["norm_proj"], s["norm_proj"])
  else:
    for i, (conv, bn) in enumerate(zip(enc.convs, enc.bns)):
      _conv(conv, pe[f"Conv_{i}"]["kernel"])
      _norm(bn, pe[f"BatchNorm_{i}"], se[f"BatchNorm_{i}"])
  ph, sh = params["head"], batch_stats["head"]
  model.head.fc1.weight.data.copy_(_t(ph["Dense_0"]["kernel"]).T)
  _norm(model.head.bn, ph["BatchNorm_0"], sh["BatchNorm_0"])
  model.head.fc2.weight.data.copy_(_t(ph["Dense_1"]["kernel"]).T)
  model.head.fc2.bias.data.copy_(_t(ph["Dense_1"]["bias"]))
