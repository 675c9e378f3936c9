"""How frames are normalized before the conv net (trainers.frames.FrameNormalizer), and why.

Pendulum renders a thin dark rod on a white page. Frames divided by 255 alone are ~1.0
everywhere: the conv net sees a large constant with a small dip, and the pixel experiment's
policies acted at random (the encoder read the angle, hardly the velocity). Runs now
subtract the mean frame of their first training batch and divide by the pixels' spread,
fitted once and saved with the weights; runs recorded before (no `normalize` in their frames
entry) still divide by 255.
"""

from __future__ import annotations

import torch

from tests.test_frames_train import (
    camera,
    mean_loss,
    pixel_batches,
    pixel_config,
    pixel_index,
    train_and_load,
)
from tests.test_trainer import InMemoryStream
from trainers import train
from trainers.models import build_model


def conv_inputs(policy, batch) -> torch.Tensor:
    """What the first conv layer of the camera's encoder is fed for `batch`."""
    seen = []
    first_conv = policy.frames.encoders["render"].convs[0]
    hook = first_conv.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        policy(batch)
    finally:
        hook.remove()
    return seen[0]


def scaled(frames: torch.Tensor, mean=0.0, std=1.0) -> torch.Tensor:
    """Frames [B, W, C, H, W] as [B * W, C, H, W] doubles: / 255, minus `mean`, / `std`."""
    return (frames.reshape(-1, *frames.shape[2:]).double() / 255.0 - mean) / std


def real_steps(batch) -> torch.Tensor:
    """The frames of the batch's real steps (mask True) in [0, 1], as doubles."""
    return batch["frame_render"][batch["mask"]].double() / 255.0


def white_page(batches):
    """The batches' frames inverted: a white page with a dark square (Pendulum's look); left
    padding stays zeros."""
    pages = []
    for batch in batches:
        real = batch["mask"][..., None, None, None]
        pages.append(dict(batch, frame_render=torch.where(real, 255 - batch["frame_render"], 0)))
    return pages


def test_the_conv_net_sees_frames_minus_their_mean_frame(tmp_path):
    (batch,) = white_page(pixel_batches("position", count=1))
    config = pixel_config(tmp_path, pixel_index({"render": camera()}), inputs="frames")
    assert config.model["frames"]["normalize"] == "mean_frame"
    policy = build_model(config.model)  # training mode: the first batch fits the normalizer
    seen = conv_inputs(policy, batch)

    # Independently: the real steps' frames in [0, 1], their per-pixel mean, one std.
    frames = real_steps(batch)
    mean = frames.mean(0)
    std = (frames - mean).std()
    assert torch.allclose(seen.double(), scaled(batch["frame_render"], mean, std), atol=1e-4)
    real = seen.reshape(*batch["mask"].shape, 3, 32, 32)[batch["mask"]]
    assert abs(float(real.mean())) < 1e-4 and abs(float(real.std()) - 1) < 1e-3
    # The white page (255 in every frame) is ~0 where it is always white, not ~1.
    always_white = (batch["frame_render"][batch["mask"]] >= 215).all(0)
    assert always_white.any() and float(real[:, always_white].abs().max()) < 0.6

    # Fitted once: a later batch, training or asking, is normalized with the same numbers.
    other = white_page(pixel_batches("position", count=1, seed=3))[0]
    later = conv_inputs(policy, other).double()
    assert torch.allclose(later, scaled(other["frame_render"], mean, std), atol=1e-4)


def test_a_run_recorded_before_normalization_divides_by_255(tmp_path):
    """A frames entry without `normalize` (every run before it) builds the same parameters
    and buffers as then, so its checkpoint loads, and feeds frames / 255."""
    config = pixel_config(tmp_path, pixel_index({"render": camera()}), inputs="frames")
    frames = {k: v for k, v in config.model["frames"].items() if k != "normalize"}
    policy = build_model({**config.model, "frames": frames})
    assert not any("normalizers" in key for key in policy.state_dict())
    (batch,) = pixel_batches("position", count=1)
    seen = conv_inputs(policy, batch)
    assert torch.equal(seen, batch["frame_render"].reshape(-1, 3, 32, 32).float() / 255.0)
    assert float(scaled(white_page([batch])[0]["frame_render"]).max()) == 1.0  # the white page


def test_on_a_white_page_the_policy_learns_motion_from_the_stack(tmp_path):
    """The motion task of test_frames_train on Pendulum's look (a dark square moving on white),
    frames alone: the direction is in the difference of the two stacked frames only."""
    torch.set_num_threads(1)
    batches = white_page(pixel_batches("motion"))
    fresh = white_page(pixel_batches("motion", seed=1))
    index = pixel_index({"render": camera()}, 2)
    config = pixel_config(tmp_path / "stack", index, inputs="frames", steps=200)
    initial = mean_loss(build_model(config.model), fresh)
    final = mean_loss(train_and_load(config, batches), fresh)  # on batches it never saw
    assert final < 0.05 * initial and final < 0.05, (initial, final)


def test_the_normalizer_fits_on_real_steps_once_and_is_saved_with_the_weights(tmp_path):
    index = pixel_index({"render": camera()}, 2)
    config = pixel_config(tmp_path, index, steps=4, checkpoint_every=2)
    batches = white_page(pixel_batches("motion", count=2))
    policy = build_model(config.model)
    policy.loss(batches[0])
    fitted = policy.frames.normalizers["render"]
    assert torch.allclose(fitted.mean.double(), real_steps(batches[0]).mean(0), atol=1e-6)

    # A trained run: the first batch's numbers, saved; loaded (eval) or resumed (training
    # mode), the policy keeps them, whatever batch it sees next.
    train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    loaded, _ = train.load_policy(str(tmp_path))
    saved = loaded.frames.normalizers["render"]
    assert bool(saved.fitted)
    assert torch.allclose(saved.mean.double(), real_steps(batches[0]).mean(0), atol=1e-6)
    resumed = build_model(config.model)
    resumed.load_state_dict(train.load_checkpoint(str(tmp_path))["model"])
    resumed.loss(batches[1])
    assert torch.equal(resumed.frames.normalizers["render"].mean, saved.mean)
    assert not torch.allclose(saved.mean.double(), real_steps(batches[1]).mean(0), atol=1e-3)
