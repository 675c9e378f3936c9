"""How a MiniGrid/BabyAI observation is stored: the contract between collect
(engine/minigrid.py), the `instructions` relabeler and the policy's view encoder.

`observation` is a struct {direction: int64, image: uint8[147]}: MiniGrid's encoded
egocentric view in (x, y, channel) order, channels (object index, colour index, state). In
the view the agent stands at OWN facing FRONT; what it carries shows in its own cell. The
indices are minigrid.core.constants' OBJECT_TO_IDX and COLOR_TO_IDX, copied so that
reading the data needs no minigrid install (tests check them against the package).
"""

from __future__ import annotations

VIEW_SHAPE = (7, 7, 3)  # MiniGrid's default agent view, (x, y, channel)
FRONT = (3, 5)  # the cell the agent faces
OWN = (3, 6)  # the agent's own cell: what it carries
OBSERVATION_SHAPES = {"image": list(VIEW_SHAPE), "direction": []}
OBSERVATION_DTYPES = {"image": "uint8", "direction": "int64"}

OBJECT_TO_IDX = {
    "unseen": 0,
    "empty": 1,
    "wall": 2,
    "floor": 3,
    "door": 4,
    "key": 5,
    "ball": 6,
    "box": 7,
    "goal": 8,
    "lava": 9,
    "agent": 10,
}
COLOR_NAMES = ("red", "green", "blue", "purple", "yellow", "grey")  # COLOR_TO_IDX order
DOOR_STATES = 3  # open, closed, locked
OBJECT_TYPES = ("key", "ball", "box")  # what BabyAI's GoTo/PickUp missions name
