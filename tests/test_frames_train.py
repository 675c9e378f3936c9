"""Training and asking from pixels: an image encoder per camera joined with the state vector
(or alone), for the MLP and the transformer; ask renders, encodes and stacks frames exactly
as the loader's contract says training saw them; a run without frames is unchanged.

Batches are built in memory in the loader's format (frames: uint8 [B, W, C * K, H, W],
channels first, the K stacked frames oldest first), so each test knows the function the
model must learn: the action is written in the pixels, so only a model that reads the frames
(and, for motion, the whole stack) can drive the loss to zero.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from engine.frames import render_frame
from jobs.cli import main as cli_main
from schemas.frames import CameraInfo, decode_frame, encode_frame
from schemas.video import decode_video, encode_video
from tests.test_trainer import CONTINUOUS, InMemoryStream, config_for, make_batches
from trainers import ask, train
from trainers.frames import NatureCNN, ResNetEncoder, nature_strides
from trainers.models import build_model
from trainers.options import TrainOptions

WINDOW, BATCH, OBS_DIM, SIZE = 4, 32, 3, 32
RTG = {"return_to_go": {"type": "scalar", "level": "steps", "mean": -400.0, "std": 300.0}}


def camera(size: int = SIZE, codec: str = "png", channels: int = 3, quality=None) -> dict:
    return CameraInfo(
        height=size, width=size, channels=channels, codec=codec, quality=quality
    ).model_dump(mode="json")


def pixel_index(cameras: dict, frame_stack: int = 1, action=CONTINUOUS, conditions=None, **extra):
    return {
        "window": WINDOW,
        "observation": {"shape": [OBS_DIM], "dtype": "float32"},
        "action": action,
        "reward": {"mean": -1.0, "std": 1.0},
        "episode_return": {
            "mean": -800.0,
            "std": 300.0,
            "min": -1500.0,
            "max": -150.0,
            "quantiles": {},
        },  # fmt: skip
        "conditions": conditions or {},
        "cameras": cameras,
        "frame_stack": frame_stack,
        "shards": [],
        "metadata": {},
        **extra,
    }


def pixel_config(run_dir, index, *, model="mlp", steps=300, **overrides):
    values = {"input": "memory://", "output": str(run_dir), "model": model, "steps": steps,
              "lr": 3e-3, "warmup": 10, "d_model": 32, "n_layer": 1, "n_head": 2, "hidden": 64,
              "log_every": 10, "checkpoint_every": 1000, "device": "cpu"}  # fmt: skip
    return train.new_run_config(index, TrainOptions(**{**values, **overrides}))


def square_frames(rng, columns: np.ndarray) -> np.ndarray:
    """uint8 [..., 3, SIZE, SIZE] frames, dark with a bright 8x8 square at `columns`."""
    frames = rng.integers(0, 40, size=(*columns.shape, 3, SIZE, SIZE), dtype=np.uint8)
    rows = np.arange(SIZE)
    inside = (rows >= 12) & (rows < 20)
    for index in np.ndindex(columns.shape):
        across = (rows >= columns[index]) & (rows < columns[index] + 8)
        frames[index][:, inside[:, None] & across[None, :]] = 255
    return frames


def pixel_batches(kind: str, count: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`position`: the action is the square's side (left -1, right +1) in a single frame;
    `motion`: two stacked frames, the square moves left (-1) or right (+1) by 6 pixels to
    a uniformly random place, so the newest frame alone says nothing about the action.
    The state vector is noise either way."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        sign = rng.choice([-1.0, 1.0], size=(BATCH, WINDOW)).astype(np.float32)
        if kind == "position":
            frames = square_frames(rng, np.where(sign > 0, 20, 4))
        else:
            end = rng.integers(6, SIZE - 13, size=(BATCH, WINDOW))  # independent of the sign
            older = square_frames(rng, end - 6 * sign.astype(int))
            newer = square_frames(rng, end)
            frames = np.concatenate([older, newer], axis=2)  # oldest first
        mask = np.ones((BATCH, WINDOW), dtype=bool)
        mask[0, :2] = False
        frames[0, :2] = 0  # left padding: zeros
        batch = {
            "observation": rng.normal(size=(BATCH, WINDOW, OBS_DIM)).astype(np.float32),
            "action": np.stack([sign, sign], -1),
            "reward": np.zeros((BATCH, WINDOW), np.float32),
            "timestep": np.tile(np.arange(WINDOW), (BATCH, 1)),
            "mask": mask,
            "frame_render": frames,
        }
        batches.append({key: torch.as_tensor(value) for key, value in batch.items()})
    return batches


def mean_loss(policy, batches) -> float:
    with torch.no_grad():
        return float(np.mean([float(policy.loss(batch)) for batch in batches]))


def train_and_load(config, batches):
    train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    return train.load_policy(config.options.output)[0]


# --- the encoders ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 48, 64, 84, 96])
@pytest.mark.parametrize("encoder", [NatureCNN, ResNetEncoder])
def test_encoders_take_frames_from_32_to_96_pixels(size, encoder):
    module = encoder(6, size, size + 8, 16)
    features = module(torch.rand(5, 6, size, size + 8))
    assert features.shape == (5, 16) and torch.all(features >= 0)  # ReLU after the linear


def test_nature_strides_are_natures_from_64_pixels_and_shrink_below():
    # Independent: out = (in - kernel) // stride + 1 through kernels 8, 4, 3.
    def out(size, strides):
        for kernel, stride in zip((8, 4, 3), strides, strict=True):
            size = (size - kernel) // stride + 1
        return size

    assert nature_strides(84, 84) == nature_strides(64, 64) == (4, 2, 1)
    assert out(84, (4, 2, 1)) == 7 and out(64, (4, 2, 1)) == 4  # Nature's 7x7 at 84x84
    assert nature_strides(32, 32) == (2, 2, 1) and out(32, (2, 2, 1)) == 3
    assert out(32, (4, 2, 1)) < 3  # Nature's strides leave nothing for the last conv
    with pytest.raises(ValueError, match="too small for the nature encoder"):
        nature_strides(12, 12)


def test_the_model_config_records_cameras_stack_encoder_and_inputs(tmp_path):
    # Facts the shard index adds beyond CameraInfo (bytes per frame) stay out of the model.
    described = {**camera(codec="jpeg", quality=80), "bytes_per_frame": 812.5}
    index = pixel_index({"render": described}, frame_stack=2)
    config = pixel_config(tmp_path, index, steps=2, frame_encoder="resnet")
    assert config.model["frames"] == {
        "cameras": {"render": camera(codec="jpeg", quality=80)},
        "frame_stack": 2,
        "encoder": "resnet",
        "inputs": "state+frames",  # the default when the shards have frames and a state
        "normalize": "mean_frame",  # trainers.frames.FrameNormalizer
    }
    train_and_load(config, pixel_batches("motion", count=1))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["model"]["frames"]["encoder"] == "resnet"
    assert any(key.startswith("frames.encoders.render.") for key in checkpoint["model"])


def test_options_choose_cameras_and_inputs_with_clear_errors(tmp_path):
    two = pixel_index({"render": camera(), "wrist": camera(48)})
    both = build_model(pixel_config(tmp_path, two).model)
    assert sorted(both.frames.encoders) == ["render", "wrist"]
    assert both.input_dim == OBS_DIM + 2 * 32  # the state, then d_model features per camera
    one = pixel_config(tmp_path, two, cameras=["wrist"], inputs="frames").model["frames"]
    assert list(one["cameras"]) == ["wrist"] and one["inputs"] == "frames"
    assert build_model(pixel_config(tmp_path, two, inputs="frames").model).input_dim == 64

    with pytest.raises(ValueError, match=r"camera\(s\) \['top'\] are not in the shard index"):
        pixel_config(tmp_path, two, cameras=["top"])
    without = pixel_index({})
    with pytest.raises(ValueError, match="--inputs frames: the shards have no camera frames"):
        pixel_config(tmp_path, without, inputs="frames")
    with pytest.raises(
        ValueError, match="too small for the nature encoder.*--frame-encoder resnet"
    ):
        pixel_config(tmp_path, pixel_index({"render": camera(12)}))
    pixels_only = {**pixel_index({"render": camera()}), "observation": {"shape": [0]}}
    assert pixel_config(tmp_path, pixels_only).model["frames"]["inputs"] == "frames"
    with pytest.raises(ValueError, match="the shards hold no state vector"):
        pixel_config(tmp_path, pixels_only, inputs="state+frames")

    # The command line: `--inputs`, `--cameras` (commas or repeated), `--frame-encoder`.
    from jobs.cli import parse

    command = parse(["train", "S", "R", "--inputs", "frames", "--cameras", "render,wrist",
                     "--frame-encoder", "resnet"])  # fmt: skip
    assert (command.inputs, command.cameras, command.frame_encoder) == (
        "frames", ["render", "wrist"], "resnet",
    )  # fmt: skip


# --- a run without frames is unchanged -------------------------------------------------------

# Measured with the trainer before frames existed (main at 30578f7), 1 torch thread: the
# final loss and the sum of all weights after 20 steps of tests/test_trainer.py's
# return_to_go batches, and the parameter count.
BEFORE_FRAMES = {
    "mlp": (2498, 0.008823682554066181, -17.551452013954986),
    "transformer": (144322, 0.022379711270332336, -438.04520891128595),
}


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_a_run_without_frames_is_unchanged(tmp_path, model):
    torch.set_num_threads(1)
    batches = make_batches("return_to_go", count=3)
    config = config_for(tmp_path, "return_to_go", model, steps=20)
    assert "frames" not in config.model
    parameters, loss, weight_sum = BEFORE_FRAMES[model]
    policy = build_model(config.model)
    assert sum(p.numel() for p in policy.parameters()) == parameters
    if model == "mlp":  # independent: (3 + 32) -> 64 -> 2, plus the condition's Linear(1, 32)
        assert parameters == (35 * 64 + 64) + (64 * 2 + 2) + (1 * 32 + 32)
    summary = train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    weights = train.load_checkpoint(str(tmp_path))["model"]
    assert summary["final_loss"] == pytest.approx(loss, rel=1e-5)
    assert sum(float(t.double().sum()) for t in weights.values()) == pytest.approx(
        weight_sum, rel=1e-5
    )

    # Shards with frames and `--inputs state`: the very same model.
    index = {**config.index, "shards": [], "cameras": {"render": camera()}, "frame_stack": 3}
    state_only = train.new_run_config(index, config.options.model_copy(update={"inputs": "state"}))
    assert state_only.model == config.model


# --- learning from pixels --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_a_policy_learns_an_action_only_the_frames_show(tmp_path, model):
    torch.set_num_threads(1)
    batches, fresh = pixel_batches("position"), pixel_batches("position", seed=1)
    index = pixel_index({"render": camera()})
    config = pixel_config(tmp_path / "frames", index, model=model, inputs="frames", steps=150)
    initial = mean_loss(build_model(config.model), fresh)
    final = mean_loss(train_and_load(config, batches), fresh)  # on batches it never saw
    assert final < 0.05 * initial and final < 0.03, (initial, final)

    # The control: the same data seen through the state vector alone cannot be learned
    # (its noise can be memorized, not generalized from).
    blind = pixel_config(tmp_path / "state", index, model=model, inputs="state", steps=150)
    # Actions +-1 are +-0.5 scaled to the box [-2, 2]: predicting 0 gives 0.25.
    assert mean_loss(train_and_load(blind, batches), fresh) > 0.2


def test_with_a_frame_stack_the_policy_learns_motion(tmp_path):
    """The square's direction of motion is in the difference of the two stacked frames only;
    state and frames together (the default inputs) fit it."""
    torch.set_num_threads(1)
    batches, fresh = pixel_batches("motion"), pixel_batches("motion", seed=1)
    config = pixel_config(tmp_path / "stack", pixel_index({"render": camera()}, 2), steps=200)
    assert config.model["frames"]["inputs"] == "state+frames"
    initial = mean_loss(build_model(config.model), fresh)
    final = mean_loss(train_and_load(config, batches), fresh)
    assert final < 0.05 * initial and final < 0.05, (initial, final)

    # The control: the older frame replaced by the newer one (the stack destroyed).
    def flat(batches):
        newest = [b["frame_render"][:, :, 3:] for b in batches]
        return [dict(b, frame_render=n.repeat(1, 1, 2, 1, 1)) for b, n in zip(batches, newest)]

    control = pixel_config(tmp_path / "flat", pixel_index({"render": camera()}, 2), steps=200)
    assert mean_loss(train_and_load(control, flat(batches)), flat(fresh)) > 0.2  # 0.25: blind


def test_resume_with_frames_matches_an_uninterrupted_run(tmp_path):
    batches = pixel_batches("motion", count=3)
    index = pixel_index({"render": camera()}, 2)
    ends = []
    for name, fail_after in (("straight", None), ("resumed", 7)):
        config = pixel_config(tmp_path / name, index, steps=12, checkpoint_every=5)
        if fail_after:
            with pytest.raises(RuntimeError, match="simulated crash"):
                train.train_loop(
                    config,
                    lambda s, r, w, after=fail_after: InMemoryStream(batches, s, fail_after=after),
                )
        train.train_loop(config, lambda s, r, w: InMemoryStream(batches, s))
        ends.append(train.load_checkpoint(str(tmp_path / name)))
    assert ends[0]["step"] == ends[1]["step"] == 12
    for key, tensor in ends[0]["model"].items():
        assert torch.equal(tensor, ends[1]["model"][key]), key


# --- asking from pixels ----------------------------------------------------------------------

PENDULUM = {"kind": "continuous", "dim": 1, "low": [-2.0], "high": [2.0]}


def tiny_pixel_run(
    run_dir, cameras, *, model="transformer", frame_stack=2, window=3, sources=None, **options
):
    """A run trained 2 steps on random frames shaped like Pendulum's (the rollout is tested);
    `sources`: the index's camera_sources (a video camera the shards hold as PNG)."""
    index = {**pixel_index(cameras, frame_stack, PENDULUM, RTG), "window": window,
             "metadata": {"env_id": "Pendulum-v1"}, "camera_sources": sources or {}}  # fmt: skip
    config = pixel_config(
        run_dir, index, model=model, steps=2, condition=["return_to_go"], **options
    )
    rng = np.random.default_rng(0)
    batch = {
        "observation": torch.as_tensor(rng.normal(size=(4, window, 3)), dtype=torch.float32),
        "action": torch.as_tensor(rng.uniform(-2, 2, size=(4, window, 1)), dtype=torch.float32),
        "reward": torch.zeros(4, window),
        "timestep": torch.arange(window).repeat(4, 1),
        "mask": torch.ones(4, window, dtype=torch.bool),
        "return_to_go": torch.full((4, window), -500.0),
    }
    for name, info in cameras.items():
        shape = (info["channels"] * frame_stack, info["height"], info["width"])
        batch[f"frame_{name}"] = torch.randint(0, 256, (4, window, *shape), dtype=torch.uint8)
    train_and_load(config, [batch])
    return str(run_dir)


class Recording(torch.nn.Module):
    """The policy, recording the frames each forward was fed and the actions it chose."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.actions = policy, policy.actions
        self.frames: list[torch.Tensor] = []
        self.chosen: list[np.ndarray] = []

    def forward(self, batch):
        self.frames.append(batch["frame_render"].clone())
        prediction = self.policy(batch)
        self.chosen.append(self.actions.to_env(prediction[:, -1].float()).numpy())
        return prediction


def rollout_and_replay(run, episodes: int, seed: int = 2):
    """The frames a rollout of `run` fed its policy (per forward: [episodes, W, C*K, H, W]),
    and each episode replayed independently with the actions it chose: the rendered
    frames of its 200 steps (Pendulum's horizon)."""
    policy, config = train.load_policy(run)
    recording = Recording(policy)
    ask.rollout(recording, config, "Pendulum-v1", {"return_to_go": -300.0}, episodes, seed=seed)
    assert len(recording.frames) == 200
    rendered = []
    for i in range(episodes):
        env = gym.make("Pendulum-v1", render_mode="rgb_array")
        env.reset(seed=seed * 100_003 + i)
        frames = []
        for t in range(200):
            frames.append(render_frame(env, SIZE, SIZE))
            env.step(recording.chosen[t][i])
        env.close()
        rendered.append(np.stack(frames))
    return recording.frames, rendered


def check_stacked(fed, stored: list[np.ndarray], stack: int, window: int) -> None:
    """Every forward's frames are the stored frames (per episode [200, H, W, C]) stacked as
    the loader's contract says: K frames oldest first, the first frame repeated before step
    0, window positions before the episode all zeros."""
    for i, frames in enumerate(stored):
        channels_first = frames.transpose(0, 3, 1, 2)
        for t in range(200):
            expected = np.zeros((window, stack * frames.shape[3], SIZE, SIZE), np.uint8)
            for position in range(window):
                step = t - (window - 1) + position
                if step >= 0:
                    expected[position] = np.concatenate(
                        [channels_first[max(0, step - (stack - 1) + k)] for k in range(stack)]
                    )
            assert np.array_equal(fed[t][i].numpy(), expected), (i, t)


def test_a_rollout_feeds_the_frames_the_loader_would_give(tmp_path):
    """Replayed independently: render every step, pass it through the camera's JPEG codec,
    and stack as the loader's contract says."""
    stack, window, episodes = 2, 3, 2
    jpeg = camera(codec="jpeg", quality=50)
    run = tiny_pixel_run(tmp_path / "run", {"render": jpeg}, frame_stack=stack, window=window)
    fed, rendered = rollout_and_replay(run, episodes)
    info = CameraInfo.model_validate(jpeg)
    stored = [np.stack([decode_frame(encode_frame(f, info), info) for f in r]) for r in rendered]
    check_stacked(fed, stored, stack, window)
    # JPEG artifacts: what the policy saw in training, it sees when asked
    assert not all(np.array_equal(s, r) for s, r in zip(stored, rendered))


@pytest.mark.parametrize("codec", ["h264", "av1"])
def test_a_rollout_of_a_video_trained_policy_sees_the_stored_videos_pixels(tmp_path, codec):
    """Shards hold a video camera's frames decoded (PNG); training saw the video's
    compression, so the rollout's frames are what the whole episode's video would show:
    replayed, encoded as one video per episode, decoded, stacked."""
    stack, window, episodes = 2, 2, 2
    video = {**camera(codec="png"), "codec": codec, "fps": 30, "gop": 2, "crf": 30}
    run = tiny_pixel_run(
        tmp_path / "run", {"render": camera()}, frame_stack=stack, window=window,
        sources={"render": video},
    )  # fmt: skip
    assert train.load_run_config(run).model["frames"]["collected_as"]["render"]["codec"] == codec
    fed, rendered = rollout_and_replay(run, episodes)
    info = CameraInfo.model_validate(video)
    stored = [decode_video(encode_video(r, info), info, "replay", len(r)) for r in rendered]
    check_stacked(fed, stored, stack, window)
    assert not all(np.array_equal(s, r) for s, r in zip(stored, rendered))  # lossy


def test_ask_from_pixels_through_the_command_line(tmp_path, capsys):
    run = tiny_pixel_run(
        tmp_path / "pixels", {"render": camera()}, model="mlp", inputs="frames", frame_stack=3
    )
    out = tmp_path / "report"
    args = ["ask", run, "--sweep", "return_to_go=-1000,-150", "--episodes", "1",
            "--output", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    report = ask.ask(run, None, {"return_to_go": "-200"}, episodes=1)
    assert report["env"] == "Pendulum-v1" and -16.3 * 200 <= report["achieved_mean"] <= 0

    # A camera ask cannot render is refused with one line.
    wrist = tiny_pixel_run(tmp_path / "wrist", {"wrist": camera()}, model="mlp")
    capsys.readouterr()
    assert cli_main(["ask", wrist, "--request", "return_to_go=-200", "--episodes", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "trained on camera(s) ['wrist']; ask renders only the environment's own" in error


def test_a_pixel_run_resumes_without_repeating_its_frame_options(tmp_path):
    index = pixel_index({"render": camera(), "wrist": camera()})
    first = pixel_config(tmp_path, index, steps=2, cameras=["wrist"], frame_encoder="resnet")
    unasked = first.options.model_copy(update={"cameras": None, "frame_encoder": None})
    resumed = train.resumed_config(first, unasked)
    assert resumed.model == first.model and resumed.options.cameras == ["wrist"]
    with pytest.raises(ValueError, match="--resume: frame_encoder was 'resnet'"):
        train.resumed_config(first, unasked.model_copy(update={"frame_encoder": "nature"}))


def test_a_rendered_frame_is_asked_as_its_camera_stored_it():
    """PNG is lossless (the frame as rendered); JPEG leaves its artifacts, as a decoded
    stored frame has them; a 1-channel camera sees the frame in grayscale (PIL's L)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rendered = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    png = CameraInfo.model_validate(camera())
    assert np.array_equal(ask.as_stored(rendered, png), rendered)
    jpeg = CameraInfo.model_validate(camera(codec="jpeg", quality=60))
    stored = decode_frame(encode_frame(rendered, jpeg), jpeg)
    assert np.array_equal(ask.as_stored(rendered, jpeg), stored)
    assert not np.array_equal(stored, rendered)
    gray = CameraInfo.model_validate(camera(channels=1))
    expected = np.asarray(Image.fromarray(rendered).convert("L"))[:, :, None]
    assert np.array_equal(ask.as_stored(rendered, gray), expected)


def test_augment_shift_is_a_frame_option_recorded_and_passed_to_the_loader(tmp_path, monkeypatch):
    from jobs.cli import parse
    from trainers import loader

    assert parse(["train", "S", "R", "--augment-shift", "2"]).augment_shift == 2
    index = pixel_index({"render": camera()}, frame_stack=2)
    config = pixel_config(tmp_path, index, steps=2, augment_shift=2)
    assert config.to_record()["options"]["augment_shift"] == 2
    seen = {}
    monkeypatch.setattr(loader, "stream", lambda *args, **kwargs: seen.update(kwargs))
    train.default_stream_factory(config)(None, 0, 1)
    assert seen["augment_shift"] == 2 and seen["cameras"] == ["render"]
    with pytest.raises(ValueError, match="--resume: augment_shift was 2"):
        train.resumed_config(config, config.options.model_copy(update={"augment_shift": 0}))
    with pytest.raises(ValueError, match="--augment-shift 2 shifts camera frames, but this policy"):
        pixel_config(tmp_path, index, inputs="state", augment_shift=2)


def test_frame_cache_mb_is_passed_to_the_loader_and_may_change_on_resume(tmp_path, monkeypatch):
    from jobs.cli import parse
    from trainers import loader

    assert parse(["train", "S", "R", "--frame-cache-mb", "0"]).frame_cache_mb == 0
    index = pixel_index({"render": camera()}, frame_stack=2)
    config = pixel_config(tmp_path, index, steps=2)
    seen = {}
    monkeypatch.setattr(loader, "stream", lambda *args, **kwargs: seen.update(kwargs))
    train.default_stream_factory(config)(None, 0, 1)
    assert seen["frame_cache_mb"] == 1024  # the default
    # It changes no batch (tests/test_frames_shards.py), so a resumed run may set another;
    # one that does not ask keeps the recorded one, not the default.
    source = config.options.input
    asked = TrainOptions(input=source, output=str(tmp_path), frame_cache_mb=64)
    resumed = train.resumed_config(config, asked)
    train.default_stream_factory(resumed)(None, 0, 1)
    assert seen["frame_cache_mb"] == 64
    plain = TrainOptions(input=source, output=str(tmp_path))
    assert train.resumed_config(resumed, plain).options.frame_cache_mb == 64
