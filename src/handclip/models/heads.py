"""Heads turn the backbone's features into one or more branch features, each of which gets its
own neck, classifier and metric losses; the test feature concatenates them all.

- ``GlobalHead``: the CLIP feature (``proj`` or ``pre_proj``), or with ``embedding="both"`` two
  branches, ``proj`` then ``pre_proj`` (CLIP-HandID and CLIP-ReID; they list them the other way
  round, which changes no distance).

Every head starts with these global branches; PCB and attention add theirs after them.
- ``PCBHead`` (Sun et al., "Beyond Part Models", 2018): the global feature plus P horizontal
  and/or vertical stripes average-pooled from the feature map (ViT: the patch-token grid).
- ``AttentionHead`` (MBA-Net, Baisa et al., ICPR 2022): the global feature plus a channel-
  attention and a spatial-attention branch (with relative positional encodings) on the map.
  MBA-Net also applies them before ResNet's last stage; here they sit on the final map, which
  works the same for ViT and RN towers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from handclip.errors import UserError
from handclip.models.backbones import Backbone


GLOBAL_FEATURES = {"proj": ["proj"], "pre_proj": ["pre_proj"], "both": ["proj", "pre_proj"]}


class GlobalHead(nn.Module):
    def __init__(self, backbone: Backbone, embedding: str):
        super().__init__()
        self.embeddings = GLOBAL_FEATURES[embedding]
        self.dims = [backbone.dims[name] for name in self.embeddings]

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [features[name] for name in self.embeddings]


class PCBHead(GlobalHead):
    def __init__(self, backbone: Backbone, embedding: str, parts: int, direction: str):
        super().__init__(backbone, embedding)
        rows, columns = backbone.map_size
        grids = {"horizontal": [(parts, 1)], "vertical": [(1, parts)], "both": [(parts, 1), (1, parts)]}
        needed = rows if direction == "horizontal" else columns if direction == "vertical" else min(rows, columns)
        if not 1 <= parts <= needed:
            raise UserError(f"config key 'model.parts': {parts} {direction} stripes do not fit the "
                            f"{rows}×{columns} feature map of {backbone.arch} at {backbone.image_size} px")
        self.grids = grids[direction]
        self.dims += [backbone.dims["map"]] * parts * len(self.grids)

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        stripes = [stripe for grid in self.grids
                   for stripe in F.adaptive_avg_pool2d(features["map"], grid).flatten(2).unbind(2)]
        return [*super().forward(features), *stripes]


class AttentionHead(GlobalHead):
    def __init__(self, backbone: Backbone, embedding: str):
        super().__init__(backbone, embedding)
        channels = backbone.dims["map"]
        self.channel_attention = ChannelAttention()
        self.spatial_attention = SpatialAttention(channels, backbone.map_size)
        self.dims += [channels, channels]

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        feature_map = features["map"]
        return [*super().forward(features),
                self.channel_attention(feature_map).mean(dim=(2, 3)),
                self.spatial_attention(feature_map).mean(dim=(2, 3))]


class ChannelAttention(nn.Module):
    """Channel self-attention in DANet's form (Fu et al., 2019), as MBA-Net uses it: no embedding
    layers, softmax over (max energy - energy). The residual weight starts at 0, so the branch
    starts as the plain map."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # (B, C, N)
        energy = flat @ flat.transpose(1, 2)  # (B, C, C)
        attention = (energy.amax(dim=-1, keepdim=True) - energy).softmax(dim=-1)
        return x + self.gamma * (attention @ flat).view_as(x)


class SpatialAttention(nn.Module):
    """Position self-attention whose logits add, to the query·key term, the query's product with
    learned embeddings of the key's row and column offset (relative positional encodings, as in
    BoTNet and MBA-Net), so the attention sees where pixels are, not only what they hold."""

    def __init__(self, channels: int, map_size: tuple[int, int], reduction: int = 8):
        super().__init__()
        rows, columns = map_size
        key_dim = max(channels // reduction, 1)
        self.query = _conv_bn_relu(channels, key_dim)
        self.key = _conv_bn_relu(channels, key_dim)
        self.value = _conv_bn_relu(channels, channels)
        self.row_offsets = nn.Parameter(torch.randn(2 * rows - 1, key_dim) * key_dim ** -0.5)
        self.column_offsets = nn.Parameter(torch.randn(2 * columns - 1, key_dim) * key_dim ** -0.5)
        row = torch.arange(rows).repeat_interleave(columns)
        column = torch.arange(columns).repeat(rows)
        # For each (query, key) pair of positions: the index of the key's offset in the tables above.
        self.register_buffer("row_index", row[None, :] - row[:, None] + rows - 1, persistent=False)
        self.register_buffer("column_index", column[None, :] - column[:, None] + columns - 1, persistent=False)
        self.scale = key_dim ** -0.5
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, rows, columns = x.shape
        positions = rows * columns
        query = self.query(x).flatten(2).transpose(1, 2)  # (B, N, d)
        logits = query @ self.key(x).flatten(2)  # (B, N, N)
        shape = (batch, positions, positions)
        logits = logits + (query @ self.row_offsets.T).gather(2, self.row_index.expand(shape))
        logits = logits + (query @ self.column_offsets.T).gather(2, self.column_index.expand(shape))
        attention = (logits * self.scale).softmax(dim=-1)
        attended = self.value(x).flatten(2) @ attention.transpose(1, 2)  # (B, C, N)
        return x + self.gamma * attended.view_as(x)


def _conv_bn_relu(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 1), nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))


# model.head → (backbone, embedding, parts, direction) → head; the config's Literal lists these keys.
HEADS = {
    "global": lambda backbone, embedding, parts, direction: GlobalHead(backbone, embedding),
    "pcb": PCBHead,
    "attention": lambda backbone, embedding, parts, direction: AttentionHead(backbone, embedding),
}


def make_head(kind: str, backbone: Backbone, embedding: str, parts: int = 4,
              direction: str = "horizontal") -> nn.Module:
    return HEADS[kind](backbone, embedding, parts, direction)
