"""What a policy sees of a MiniGrid view (engine/minigrid.py): indices in one-hot, and where
the cells match the condition.

The shards hold a MiniGrid step as 148 floats, [direction, 147 view numbers in (x, y,
channel) order] (channels: object type, colour, state). Those are indices, not magnitudes:
each goes in one-hot (984 numbers). A GoTo policy must find the cell whose object and colour
the instruction names, a conjunction a plain MLP over (view, condition) learns slowly;
`ViewMatch` scores every cell against the condition embedding (a few dot-product heads, as
FiLM or attention would) and hands the 49-cell maps to the network next to the view.

Two encodings of what the network sees next to the maps:
- `minigrid_relational` (new runs): the layout only, i.e. walls, doors, where an object is
  and the direction, but not which object or colour it is: an object's identity reaches the
  network only through its match against the words. A policy that saw identities learned
  "never go to a red key" from data where red keys were held out of every instruction, and
  asked for one went elsewhere (docs/trainer.md, the BabyAI experiment, run 1);
- `minigrid_one_hot` (runs before it): the whole one-hot view.

Two matches (the run's config records which, `view_match`):
- `factored` (new runs): per head, a colour score (the cell's colour one-hot against a
  colour query from the words) and an object score (its object type against an object
  query), combined as sigmoid(colour) x sigmoid(object): an AND. "grey key" lights a grey
  key, not a grey ball or a blue key; and since the queries are linear in a sentence vector
  that is near a mean of word vectors, the colour query of an unseen pair is near the one of
  a trained pair with the same colour, so the AND composes to pairs no instruction named;
- `additive` (runs without the key): one Linear over the cell's whole one-hot dotted with
  a query, a score that is a sum of a colour term and an object term, so a cell matching
  either word scores nearly as high as one matching both.
Measured in docs/trainer.md ("MiniGrid views", the BabyAI experiment).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from schemas.minigrid import COLOR_NAMES, DOOR_STATES, OBJECT_TO_IDX, OBJECT_TYPES, VIEW_SHAPE

MINIGRID_ONE_HOT = "minigrid_one_hot"
MINIGRID_RELATIONAL = "minigrid_relational"
MINIGRID_SIZES = (len(OBJECT_TO_IDX), len(COLOR_NAMES), DOOR_STATES)
MINIGRID_CELLS = VIEW_SHAPE[0] * VIEW_SHAPE[1]
CELL_DIM = sum(MINIGRID_SIZES)
MINIGRID_ONE_HOT_DIM = 4 + MINIGRID_CELLS * CELL_DIM
OBJECTS = tuple(OBJECT_TO_IDX[o] for o in OBJECT_TYPES)  # one "object" in the layout
LAYOUT_CELL_DIM = MINIGRID_SIZES[0] - len(OBJECTS) + 1 + MINIGRID_SIZES[2]
MINIGRID_LAYOUT_DIM = 4 + MINIGRID_CELLS * LAYOUT_CELL_DIM
VIEW_MATCH_ADDITIVE = "additive"  # a config without `view_match`
VIEW_MATCH_FACTORED = "factored"


def is_minigrid_view(index: dict[str, Any]) -> bool:
    """Shards of a MiniGrid dataset: the view's shape recorded, 1 + 147 numbers per step."""
    shapes = (index.get("metadata") or {}).get("observation_shapes") or {}
    shape = index["observation"].get("shape") or []
    return shapes.get("image") == [7, 7, 3] and list(shape) == [1 + MINIGRID_CELLS * 3]


def minigrid_one_hot(observation: torch.Tensor) -> torch.Tensor:
    """[..., 148] (direction, view) as [..., 984]: the direction's one-hot, then each cell's
    object, colour and state one-hots (an index out of range: zeros)."""
    values = observation.round().long()
    view = values[..., 1:].reshape(*values.shape[:-1], MINIGRID_CELLS, 3)
    cells = []
    for channel, size in enumerate(MINIGRID_SIZES):
        index = view[..., channel]
        cells.append(F.one_hot(index.clamp(0, size - 1), size) * (index < size).unsqueeze(-1))
    direction = F.one_hot(values[..., 0].clamp(0, 3), 4)
    return torch.cat([direction, torch.cat(cells, dim=-1).flatten(-2)], dim=-1).float()


def minigrid_layout(one_hot: torch.Tensor) -> torch.Tensor:
    """The layout of a one-hot view [..., 984] as [..., 592]: the direction, and per cell its
    object type with key, ball and box as one "object", and its state; no colours."""
    cells = one_hot[..., 4:].reshape(*one_hot.shape[:-1], MINIGRID_CELLS, CELL_DIM)
    kinds = cells[..., : MINIGRID_SIZES[0]]
    others = [i for i in range(MINIGRID_SIZES[0]) if i not in OBJECTS]
    is_object = kinds[..., list(OBJECTS)].sum(-1, keepdim=True)
    state = cells[..., MINIGRID_SIZES[0] + MINIGRID_SIZES[1] :]
    layout = torch.cat([kinds[..., others], is_object, state], dim=-1)
    return torch.cat([one_hot[..., :4], layout.flatten(-2)], dim=-1)


def view_cells(one_hot: torch.Tensor) -> torch.Tensor:
    """A one-hot view [..., 984] as its cells [..., 49, 20] (object, colour, state)."""
    return one_hot[..., 4:].reshape(*one_hot.shape[:-1], MINIGRID_CELLS, CELL_DIM)


class ViewMatch(nn.Module):
    """Per-cell match of a one-hot view against the condition: `heads` maps of 49 scores,
    each a dot product of a key from the cell's whole one-hot and a query (`additive`)."""

    def __init__(self, d_model: int, heads: int = 4, dim: int = 32):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.cell = nn.Linear(CELL_DIM, heads * dim)
        self.query = nn.Linear(d_model, heads * dim)
        self.output_dim = heads * MINIGRID_CELLS

    def forward(self, one_hot: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        cells = view_cells(one_hot)
        keys = self.cell(cells).reshape(*cells.shape[:-1], self.heads, self.dim)
        query = self.query(condition).reshape(*condition.shape[:-1], 1, self.heads, self.dim)
        scores = (keys * query).sum(-1) / math.sqrt(self.dim)  # [..., 49, heads]
        return scores.transpose(-1, -2).flatten(-2)


class FactoredViewMatch(nn.Module):
    """Per-cell match of a one-hot view against the condition, colour AND object: `heads`
    maps of 49 scores in [0, 1], sigmoid(colour score) x sigmoid(object score) (`factored`)."""

    def __init__(self, d_model: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.kinds, self.colours = MINIGRID_SIZES[0], MINIGRID_SIZES[1]
        self.colour_query = nn.Linear(d_model, heads * self.colours)
        self.object_query = nn.Linear(d_model, heads * self.kinds)
        self.output_dim = heads * MINIGRID_CELLS

    def scores(self, one_hot: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The colour and the object score of every cell, each [..., heads, 49]."""
        cells = view_cells(one_hot)
        kinds = cells[..., : self.kinds]
        colours = cells[..., self.kinds : self.kinds + self.colours]
        lead = condition.shape[:-1]
        colour_query = self.colour_query(condition).reshape(*lead, self.heads, self.colours)
        object_query = self.object_query(condition).reshape(*lead, self.heads, self.kinds)
        colour = torch.einsum("...cn,...hn->...hc", colours, colour_query)
        kind = torch.einsum("...cn,...hn->...hc", kinds, object_query)
        return colour, kind

    def forward(self, one_hot: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        colour, kind = self.scores(one_hot, condition)
        return (torch.sigmoid(colour) * torch.sigmoid(kind)).flatten(-2)  # [..., heads * 49]


def view_match(kind: str | None, d_model: int) -> nn.Module:
    """The match a run's config names (`view_match`; absent: the additive one it had)."""
    if kind in (None, VIEW_MATCH_ADDITIVE):
        return ViewMatch(d_model)
    if kind == VIEW_MATCH_FACTORED:
        return FactoredViewMatch(d_model)
    raise ValueError(f"unknown view_match {kind!r} in the run's config")
