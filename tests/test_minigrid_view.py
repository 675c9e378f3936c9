"""The factored view match (trainers/minigrid_view.py): colour AND object, per cell."""

from __future__ import annotations

import numpy as np
import torch

from schemas.minigrid import COLOR_NAMES, OBJECT_TO_IDX, OBJECT_TYPES
from trainers.minigrid_view import (
    MINIGRID_CELLS,
    FactoredViewMatch,
    ViewMatch,
    minigrid_one_hot,
    view_match,
)

EMPTY = (OBJECT_TO_IDX["empty"], 0, 0)  # as MiniGrid encodes an empty cell: colour 0 (red)


def one_hot_view(cells: dict[int, tuple[int, int, int]], direction: int = 0) -> torch.Tensor:
    """A one-hot view [984] with the given (object, colour, state) at cell positions, the
    other cells empty."""
    view = np.array([cells.get(i, EMPTY) for i in range(MINIGRID_CELLS)])
    vector = np.concatenate([[direction], view.reshape(-1)])
    return minigrid_one_hot(torch.tensor(vector, dtype=torch.float32)[None])[0]


def cell(colour: str, kind: str) -> tuple[int, int, int]:
    return (OBJECT_TO_IDX[kind], COLOR_NAMES.index(colour), 0)


def test_shapes_and_a_cell_matching_both_words_scores_above_cells_matching_one():
    torch.manual_seed(0)
    match = FactoredViewMatch(d_model=8, heads=4)
    views = torch.stack([one_hot_view({0: cell("grey", "key")}) for _ in range(6)])
    condition = torch.randn(2, 3, 8)
    assert match(views.reshape(2, 3, -1), condition).shape == (2, 3, 4 * MINIGRID_CELLS)
    assert match.output_dim == 4 * MINIGRID_CELLS

    # Queries set by hand: head 0 asks for grey (colour) and key (object), whatever the text.
    with torch.no_grad():
        for layer in (match.colour_query, match.object_query):
            layer.weight.zero_()
            layer.bias.fill_(-3.0)
        match.colour_query.bias[COLOR_NAMES.index("grey")] = 3.0
        match.object_query.bias[OBJECT_TO_IDX["key"]] = 3.0
    layout = {
        0: cell("grey", "key"),
        1: cell("grey", "ball"),
        2: cell("blue", "key"),
        3: cell("blue", "ball"),
        4: (OBJECT_TO_IDX["wall"], COLOR_NAMES.index("grey"), 0),
    }
    scores = match(one_hot_view(layout)[None], torch.zeros(1, 8))[0, :MINIGRID_CELLS]
    both, colour_only, object_only, neither, grey_wall = scores[:5].tolist()
    assert both > 0.9 and max(colour_only, object_only, grey_wall) < 0.05 and neither < 0.01
    assert both > 10 * (colour_only + object_only)  # an AND, not a sum
    assert scores[5:].max() < 0.01  # empty cells (encoded red) match nothing here


def test_a_config_without_view_match_builds_the_additive_match_as_before():
    assert isinstance(view_match(None, 16), ViewMatch)
    assert isinstance(view_match("additive", 16), ViewMatch)
    assert isinstance(view_match("factored", 16), FactoredViewMatch)


def test_the_factored_match_composes_to_pairs_it_was_never_shown():
    """Sentence vectors as a bag of word vectors (as WordLlama's are, nearly): trained to find
    14 colour-object pairs in a room that holds all 18, the match finds the 4 held-out ones."""
    generator = torch.Generator().manual_seed(0)
    d = 32
    words = {w: torch.randn(d, generator=generator) for w in (*COLOR_NAMES, *OBJECT_TYPES)}
    frame = torch.randn(d, generator=generator)  # "go to the"
    pairs = [(c, o) for c in COLOR_NAMES for o in OBJECT_TYPES]
    held_out = [("grey", "key"), ("yellow", "box"), ("blue", "ball"), ("red", "box")]
    trained = [p for p in pairs if p not in held_out]
    view = one_hot_view({i: cell(*p) for i, p in enumerate(pairs)})

    def sentence(pair: tuple[str, str]) -> torch.Tensor:
        return (frame + words[pair[0]] + words[pair[1]]) / 3

    torch.manual_seed(0)
    match = FactoredViewMatch(d_model=d, heads=1)
    optimizer = torch.optim.Adam(match.parameters(), lr=0.05)
    conditions = torch.stack([sentence(p) for p in trained])
    target = torch.zeros(len(trained), MINIGRID_CELLS)
    target[torch.arange(len(trained)), [pairs.index(p) for p in trained]] = 1.0
    for _ in range(300):
        scores = match(view.expand(len(trained), -1), conditions).clamp(1e-6, 1 - 1e-6)
        loss = torch.nn.functional.binary_cross_entropy(scores, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = match(view.expand(len(held_out), -1), torch.stack([sentence(p) for p in held_out]))
    for row, pair in zip(scores, held_out):
        assert int(row.argmax()) == pairs.index(pair), pair
        sharing_one = [pairs.index(p) for p in pairs if p != pair and (p[0] == pair[0] or p[1] == pair[1])]  # fmt: skip
        assert row[pairs.index(pair)] > 0.5 > float(row[sharing_one].max()), pair
