"""`hindsight view`: a PNG contact sheet of one episode's camera frames."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs.command import Command, Dataset, UserError


class View(Command):
    """Write a contact sheet of an episode's frames (PNG), each frame with its step index,
    reward and the chosen columns under it: see what a label or a description claims.

        hindsight view data/pend-pix --episode 12 --output ep12.png
        hindsight view data/pend-pix-rl --episode 12 --output ep12.png --every 5 \\
            --columns return_to_go,noise
    """

    name = "view"

    input: CliPositionalArg[Dataset] = Field(description="Dataset version with camera frames.")
    episode: int = Field(description="Episode id to show.")
    output: str = Field(
        "episode.png", description="PNG file to write (a local path or s3://bucket/key)."
    )
    camera: str | None = Field(None, description="Camera to show; default: the only one.")
    every: int | None = Field(
        None, ge=1, description="Show every k-th step; default: at most 64 frames."
    )
    columns: list[str] = Field(
        default=[],
        description="Step or episode columns written under each frame (after t and reward).",
        json_schema_extra={"metavar": "COLUMN,..."},
    )

    def run(self) -> dict[str, Any]:
        from engine.query import QueryError
        from engine.view import ViewError, view_episode

        if not self.output.lower().endswith(".png"):
            raise UserError(f"--output {self.output}: a contact sheet is a .png file")
        try:
            return view_episode(
                self.input, self.episode, self.output, self.camera, self.every, self.columns
            )
        except (ViewError, QueryError) as error:
            raise UserError(str(error)) from None

    def report(self, result: dict[str, Any], seconds: float) -> str:
        steps = result["steps"]
        shown = f"steps {steps[0]}..{steps[-1]} every {result['every']}" if steps else "no steps"
        return (
            f"wrote {result['output']}: episode {result['episode']}, camera {result['camera']}, "
            f"{result['frames']} frames ({shown}), {result['width']}x{result['height']} px"
        )
