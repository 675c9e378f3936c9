"""The trainer: the loss goes near zero on a tiny dataset for every conditioning type, and a
run interrupted after a checkpoint and resumed ends bitwise where an uninterrupted run ends.

Batches are built in memory exactly in the loader's format (trainers/loader/) so that each
test knows the function the model must learn: the action is a function of the condition,
so only a model that reads the condition can drive the loss to zero.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import train
from trainers.models import build_model
from trainers.options import RunConfig, TrainOptions

WINDOW, BATCH, OBS_DIM = 4, 32, 3


def tiny_index(action: dict, conditions: dict) -> dict:
    return {
        "window": WINDOW,
        "observation": {"shape": [OBS_DIM], "dtype": "float32"},
        "action": action,
        "reward": {"mean": -1.0, "std": 1.0},
        "episode_return": {"mean": -50.0, "std": 10.0, "min": -80.0, "max": -20.0, "quantiles": {}},
        "conditions": conditions,
        "shards": [],
        "metadata": {},
    }


CONTINUOUS = {"kind": "continuous", "dim": 2, "low": [-2.0, -2.0], "high": [2.0, 2.0]}
DISCRETE = {"kind": "discrete", "n": 3}
VOCABULARY = ["<pad>", "<unk>", "go", "left", "right", "stay"]


def make_batches(condition: str, count: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches where the action is determined by the condition (or, for `none`,
    by the observation); the first window of every batch is left-padded."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        observation = rng.normal(size=(BATCH, WINDOW, OBS_DIM)).astype(np.float32)
        mask = np.ones((BATCH, WINDOW), dtype=bool)
        mask[0, :2] = False
        batch = {
            "observation": observation,
            "reward": rng.normal(size=(BATCH, WINDOW)).astype(np.float32),
            "timestep": np.tile(np.arange(WINDOW), (BATCH, 1)),
            "mask": mask,
        }
        if condition == "none":
            batch["action"] = np.clip(observation[..., :2], -2, 2)
        elif condition == "return_to_go":
            rtg = rng.choice([-200.0, -20.0], size=(BATCH, WINDOW)).astype(np.float32)
            batch["return_to_go"] = rtg
            batch["action"] = np.stack([np.sign(rtg + 100.0)] * 2, -1).astype(np.float32)
        elif condition == "hindsight_goal":
            goal = rng.uniform(-1, 1, size=(BATCH, WINDOW, 2)).astype(np.float32)
            batch["hindsight_goal"] = goal
            batch["action"] = goal
        elif condition == "skill":
            skill = rng.integers(0, 3, size=(BATCH, WINDOW))
            batch["skill"] = skill
            batch["action"] = skill
        elif condition == "description":
            word = rng.integers(0, 3, size=BATCH)
            tokens = np.zeros((BATCH, 5), dtype=np.int64)
            tokens[:, 0] = 2  # "go"
            tokens[:, 1] = 3 + word  # left / right / stay
            batch["description"] = tokens
            batch["action"] = np.repeat(word[:, None], WINDOW, 1)
        batches.append({k: torch.as_tensor(v) for k, v in batch.items()})
    return batches


CASES = {
    "none": (CONTINUOUS, {}),
    "return_to_go": (
        CONTINUOUS,
        {"return_to_go": {"type": "scalar", "level": "steps", "mean": -110.0, "std": 90.0}},
    ),
    "hindsight_goal": (
        CONTINUOUS,
        {
            "hindsight_goal": {
                "type": "vector",
                "level": "steps",
                "dim": 2,
                "mean": [0.0, 0.0],
                "std": [0.6, 0.6],
            }
        },
    ),
    "skill": (
        DISCRETE,
        {"skill": {"type": "categorical", "level": "episodes", "vocabulary": ["a", "b", "c"]}},
    ),
    "description": (
        DISCRETE,
        {
            "description": {
                "type": "text",
                "level": "episodes",
                "vocabulary": VOCABULARY,
                "max_tokens": 5,
            }
        },
    ),
}


class InMemoryStream:
    """A loader stand-in with the loader's interface: iterable, `state_dict()`, resumable
    from `start_state`; batches cycle in a fixed order. `fail_after` simulates a crash."""

    def __init__(self, batches, start_state=None, fail_after: int | None = None):
        self.batches = batches
        self.position = int(start_state["position"]) if start_state else 0
        self.fail_after = fail_after

    def __iter__(self):
        served = 0
        while True:
            if self.fail_after is not None and served == self.fail_after:
                raise RuntimeError("simulated crash")
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            served += 1
            yield batch

    def state_dict(self):
        return {"position": self.position}


def config_for(run_dir, condition: str, model: str, steps: int, **overrides) -> dict:
    action, conditions = CASES[condition]
    values = {
        "input": "memory://",
        "output": str(run_dir),
        "condition": [] if condition == "none" else [condition],
        "model": model,
        "steps": steps,
        "lr": 3e-3,
        "warmup": 10,
        "d_model": 32,
        "n_layer": 1,
        "n_head": 2,
        "hidden": 64,
        "log_every": 10,
        "checkpoint_every": 1000,
        "device": "cpu",
    }
    options = TrainOptions(**{**values, **overrides})
    return train.new_run_config(tiny_index(action, conditions), options)


@pytest.mark.parametrize(
    "condition,model",
    [
        ("none", "mlp"),
        ("return_to_go", "mlp"),
        ("hindsight_goal", "mlp"),
        ("skill", "mlp"),
        ("description", "mlp"),
        ("return_to_go", "transformer"),
        ("skill", "transformer"),
        ("description", "transformer"),
    ],
)
def test_loss_goes_near_zero_for_each_conditioning_type(tmp_path, condition, model):
    torch.set_num_threads(1)
    batches = make_batches(condition)
    config = config_for(tmp_path, condition, model, steps=300)
    policy = build_model(config.model)
    policy.fit_observation_normalizer(batches[0])
    with torch.no_grad():
        initial = float(np.mean([float(policy.loss(b)) for b in batches]))

    summary = train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    assert summary["steps"] == 300

    trained, _ = train.load_policy(str(tmp_path))
    with torch.no_grad():
        final = float(np.mean([float(trained.loss(b)) for b in batches]))
    assert final < 0.05 * initial and final < 0.03, (initial, final)
    metrics = train.read_metrics(str(tmp_path))
    assert metrics[-1]["step"] == 300 and metrics[-1]["samples_per_s"] > 0


def test_without_the_condition_the_loss_stays_high(tmp_path):
    """The control: the same skill data with condition none cannot be fitted."""
    batches = make_batches("skill")
    config = config_for(tmp_path, "skill", "mlp", steps=200)
    config = train.new_run_config(
        tiny_index(DISCRETE, {}), config.options.model_copy(update={"condition": []})
    )
    train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    trained, _ = train.load_policy(str(tmp_path))
    with torch.no_grad():
        final = float(np.mean([float(trained.loss(b)) for b in batches]))
    assert final > 0.5  # ~log(3) = 1.1 for three equally likely labels


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_resume_matches_an_uninterrupted_run(tmp_path, model):
    batches = make_batches("return_to_go", count=5)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()

    straight = config_for(straight_dir, "return_to_go", model, steps=20, checkpoint_every=10)
    train.train_loop(straight, lambda state, rank, world: InMemoryStream(batches, state))

    resumed = config_for(resumed_dir, "return_to_go", model, steps=20, checkpoint_every=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_loop(
            resumed, lambda state, rank, world: InMemoryStream(batches, state, fail_after=13)
        )
    assert int(train.load_checkpoint(str(resumed_dir))["step"]) == 10
    train.train_loop(resumed, lambda state, rank, world: InMemoryStream(batches, state))

    a = train.load_checkpoint(str(straight_dir))
    b = train.load_checkpoint(str(resumed_dir))
    assert a["step"] == b["step"] == 20
    assert a["loader"] == b["loader"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])


@pytest.mark.parametrize("grad_clip", [0.05, 100.0])  # clipped on every step / never
def test_the_trainer_steps_bit_for_bit_like_a_plain_pytorch_loop(tmp_path, grad_clip):
    """The trainer's step (its own gradient clipping, no autocast context on the CPU, the
    loss called directly) trains exactly the weights of the loop everyone writes with
    torch's clip_grad_norm_, the same learning-rate schedule and AdamW."""
    batches = make_batches("return_to_go", count=3)
    config = config_for(tmp_path, "return_to_go", "mlp", steps=25, grad_clip=grad_clip)
    train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))

    options = config.options
    torch.manual_seed(options.seed)
    policy = build_model(config.model)
    policy.condition.embed_texts()
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=options.lr, weight_decay=options.weight_decay, foreach=True
    )
    policy.fit_observation_normalizer(batches[0])
    clipped = 0
    for step in range(options.steps):
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(step, options)
        loss = policy.loss(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipped += bool(torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip) > grad_clip)
        optimizer.step()
    assert (clipped > 0) == (grad_clip < 1), clipped
    trained = train.load_checkpoint(str(tmp_path))["model"]
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_only_policies_on_frames_load_batches_in_a_background_thread(tmp_path):
    config = config_for(tmp_path, "return_to_go", "mlp", steps=1)
    assert train.loader_prefetch(config.model) == 0  # cut between steps, in this thread
    frames = {**config.model, "frames": {"inputs": "frames", "cameras": {"render": {}}}}
    assert train.loader_prefetch(frames) == 2


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_gradients_is_clip_grad_norm_bit_for_bit(max_norm):
    generator = torch.Generator().manual_seed(3)
    shapes = [(64, 35), (64,), (1, 64), (1,), (7, 3)]
    ours = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    theirs = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    for a, b in zip(ours[:-1], theirs[:-1]):  # the last one has no gradient, as unused ones
        a.grad = torch.randn(a.shape, generator=generator)
        b.grad = a.grad.clone()
    norm = train.clip_gradients(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(norm, expected)
    for a, b in zip(ours, theirs):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert ours[-1].grad is None


def test_checkpoint_loads_with_weights_only(tmp_path):
    batches = make_batches("skill", count=1)
    config = config_for(tmp_path, "skill", "transformer", steps=3)
    train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["model"]["conditions"]["skill"]["type"] == "categorical"


def test_every_option_is_described_and_none_means_behaviour_cloning():
    assert all(field.description for field in TrainOptions.model_fields.values())
    assert TrainOptions(input="x", output="y", condition=["none"]).condition == []
    assert TrainOptions(input="x", output="y", condition=["a,b", "c"]).condition == ["a", "b", "c"]


def test_a_run_recorded_by_the_old_trainer_still_loads(tmp_path):
    """Runs written before the options had their own model recorded `shards`/`run_dir` and
    the command's fields (workers, address, resume) with them: they still load."""
    batches = make_batches("skill", count=1)
    config = config_for(tmp_path, "skill", "mlp", steps=2)
    train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    checkpoint = train.load_checkpoint(str(tmp_path))
    options = dict(checkpoint["config"]["options"])
    options["shards"], options["run_dir"] = options.pop("input"), options.pop("output")
    options.update(workers=1, address=None, resume=False)
    checkpoint["config"]["options"] = options
    torch.save(checkpoint, tmp_path / "checkpoint.pt")

    policy, loaded = train.load_policy(str(tmp_path))
    assert loaded.options.input == "memory://" and loaded.options.output == str(tmp_path)
    assert loaded.options.condition == ["skill"]
    assert loaded == RunConfig.from_record(loaded.to_record())
    with torch.no_grad():
        assert torch.isfinite(policy.loss(batches[0]))


class SignalAfter(InMemoryStream):
    """Sends this process `signals` while serving batch number `after` (0-based)."""

    def __init__(self, batches, start_state=None, after: int = 2, signals=(signal.SIGINT,)):
        super().__init__(batches, start_state)
        self.after, self.signals = after, signals

    def __iter__(self):
        for served, batch in enumerate(super().__iter__()):
            if served == self.after:
                for number in self.signals:
                    os.kill(os.getpid(), number)
            yield batch


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_in_flight_with_a_checkpoint(tmp_path, signal_number):
    batches = make_batches("return_to_go", count=3)
    config = config_for(tmp_path, "return_to_go", "mlp", steps=50, checkpoint_every=1000)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    summary = train.train_loop(
        config,
        lambda state, rank, world: SignalAfter(batches, state, after=2, signals=[signal_number]),
    )
    name = signal.Signals(signal_number).name
    assert summary["stopped_by"] == name and summary["steps"] == 3
    assert int(train.load_checkpoint(str(tmp_path))["step"]) == 3
    assert train.STOP_EXIT_CODES[name] == 128 + signal_number
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    message = train.stop_message(summary, "hindsight train S R --resume")
    assert "after step 3 of 50" in message and message.endswith("hindsight train S R --resume")

    # Resumed, the run continues from step 3 to its end.
    summary = train.train_loop(config, lambda state, rank, world: InMemoryStream(batches, state))
    assert summary["stopped_by"] is None and summary["steps"] == 50


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    batches = make_batches("return_to_go", count=3)
    config = config_for(tmp_path, "return_to_go", "mlp", steps=50, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train.train_loop(
            config,
            lambda state, rank, world: SignalAfter(
                batches, state, after=4, signals=[signal.SIGINT, signal.SIGINT]
            ),
        )
    assert int(train.load_checkpoint(str(tmp_path))["step"]) == 4  # the last periodic one


def test_unknown_condition_column_is_a_clear_error():
    with pytest.raises(KeyError, match="not in the shard index"):
        train.new_run_config(
            tiny_index(CONTINUOUS, {}),
            TrainOptions(input="x", output="y", condition=["return_to_go"]),
        )


# --- the real pipeline: dataset -> relabel -> shards -> loader -> trainer -------------------


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory, ray_local):
    """A tiny synthetic dataset relabeled with returns and skill, sharded into 3 shards."""
    from jobs.commands.relabel import Relabel
    from jobs.commands.shard import Shard
    from tests.synthetic import make_episodes, write_synthetic_dataset

    root = tmp_path_factory.mktemp("real")
    steps, episodes = make_episodes(num_episodes=24, obs_dim=3, action_dim=2, seed=0)
    write_synthetic_dataset(str(root / "raw"), steps, episodes, part_steps=120)
    Relabel(
        input=str(root / "raw"),
        output=str(root / "relabeled"),
        relabelers=["returns", "skill:levels=2"],
    ).run()
    Shard(
        input=str(root / "relabeled"),
        output=str(root / "shards"),
        condition=["return_to_go", "skill"],
        window=4,
        shard_steps=150,
        block_steps=64,
    ).run()
    return str(root / "shards")


def test_train_command_on_real_shards(tmp_path, real_shards, capsys):
    from jobs.cli import main as cli_main

    run = str(tmp_path / "run")
    args = ["train", real_shards, run, "--condition", "return_to_go,skill", "--model",
            "transformer", "--steps", "12", "--batch-size", "16", "--d-model", "16",
            "--n-layer", "1", "--n-head", "2", "--log-every", "4"]  # fmt: skip
    assert cli_main(args) == 0
    assert [m["step"] for m in train.read_metrics(run)] == [4, 8, 12]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 12 and checkpoint["loader"][0]
    assert set(checkpoint["config"]["model"]["conditions"]) == {"return_to_go", "skill"}

    # A finished run is not silently overwritten; --resume extends it.
    assert cli_main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli_main([*args[:8], "20", *args[9:], "--resume"]) == 0
    assert int(train.load_checkpoint(run)["step"]) == 20
    # Resuming needs only the run and the new length: the rest is the recorded run's.
    assert cli_main(["train", real_shards, run, "--resume", "--steps", "24"]) == 0
    assert int(train.load_checkpoint(run)["step"]) == 24
    assert cli_main(["train", real_shards, run, "--resume", "--steps", "28", "--model", "mlp"]) == 2
    assert "--resume: model was 'transformer'" in capsys.readouterr().err

    # A run that cannot start leaves no directory behind.
    assert cli_main(["train", str(tmp_path / "nothing"), str(tmp_path / "bad-run")]) == 2
    assert "no index.json" in capsys.readouterr().err
    assert not (tmp_path / "bad-run").exists()


def test_resume_through_the_real_loader_matches(tmp_path, real_shards):
    """Interrupted after a checkpoint, resumed from the loader's saved position: the same
    parameters, bitwise, as an uninterrupted run over the same shards."""
    from trainers.loader import read_index

    index = read_index(real_shards).model_dump(mode="json")

    def config(run_dir):
        options = TrainOptions(
            input=real_shards, output=str(run_dir), condition=["return_to_go"], model="mlp",
            steps=16, batch_size=8, hidden=16, d_model=8, checkpoint_every=8, shuffle_buffer=64,
            device="cpu",
        )  # fmt: skip
        return train.new_run_config(index, options)

    def crashing(factory, after):
        class Crashing:
            def __init__(self, inner):
                self.inner = inner

            def __iter__(self):
                for served, batch in enumerate(self.inner):
                    if served == after:
                        raise RuntimeError("simulated crash")
                    yield batch

            def state_dict(self):
                return self.inner.state_dict()

        return lambda state, rank, world: Crashing(factory(state, rank, world))

    straight = config(tmp_path / "straight")
    train.train_loop(straight, train.default_stream_factory(straight))
    resumed = config(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_loop(resumed, crashing(train.default_stream_factory(resumed), 11))
    train.train_loop(resumed, train.default_stream_factory(resumed))

    a = train.load_checkpoint(str(tmp_path / "straight"))
    b = train.load_checkpoint(str(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 16 and a["loader"] == b["loader"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.slow
def test_two_ray_train_workers(tmp_path, real_shards):
    from jobs.commands.train import Train

    summary = Train(
        input=real_shards,
        output=str(tmp_path / "ddp"),
        condition=["skill"],
        model="mlp",
        steps=6,
        batch_size=8,
        hidden=16,
        d_model=8,
        log_every=3,
        workers=2,
    ).run()
    assert summary["workers"] == 2 and summary["steps"] == 6
    checkpoint = train.load_checkpoint(str(tmp_path / "ddp"))
    assert len(checkpoint["loader"]) == 2  # one loader position per rank
    assert [m["step"] for m in train.read_metrics(str(tmp_path / "ddp"))] == [3, 6]


def start_training(run: Path, shards: str, log: Path) -> subprocess.Popen:
    """`hindsight train` in a child process, long enough to be stopped by a signal."""
    args = [sys.executable, "-m", "jobs.cli", "train", shards, str(run), "--condition",
            "return_to_go", "--model", "mlp", "--steps", "100000", "--batch-size", "8",
            "--hidden", "16", "--d-model", "8", "--log-every", "5", "--checkpoint-every",
            "100000", "--shuffle-buffer", "64"]  # fmt: skip
    environment = {**os.environ, "HINDSIGHT_PROGRESS_SECONDS": "0.2"}
    root = Path(__file__).resolve().parent.parent
    with open(log, "w") as stderr:
        return subprocess.Popen(args, cwd=root, env=environment, stdout=stderr, stderr=stderr)


def stop_after_first_metrics_line(
    process: subprocess.Popen, run: Path, log: Path, signal_number
) -> int:
    """Signal the child once it has written a metrics line and a progress line."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip() and "train: " in log.read_text()):
        assert process.poll() is None, "training ended before its first metrics line"
        assert time.monotonic() < deadline, "no metrics or progress line after 180 s"
        time.sleep(0.05)
    process.send_signal(signal_number)
    return process.wait(timeout=120)


@pytest.mark.parametrize(
    "signal_number,code,said",
    [(signal.SIGINT, 130, "train interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_a_signalled_train_command_checkpoints_and_says_how_to_resume(
    tmp_path, real_shards, signal_number, code, said
):
    from jobs.cli import main as cli_main

    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    process = start_training(run, real_shards, log)
    assert stop_after_first_metrics_line(process, run, log, signal_number) == code
    output = log.read_text()
    last = output.strip().splitlines()[-1]
    assert said in last and "Resume with: hindsight train" in last and last.endswith("--resume")
    assert "train: " in output and "samples/s" in output and "ETA" in output  # progress lines

    stopped = int(train.load_checkpoint(str(run))["step"])
    assert 5 <= stopped < 100000 and f"after step {stopped:,} of 100,000" in last
    # The printed command resumes the run (asked here to stop 7 steps later).
    words = shlex.split(last.split("Resume with: ", 1)[1])
    assert words[:2] == ["hindsight", "train"]
    words[words.index("--steps") + 1] = str(stopped + 7)
    assert cli_main(words[1:]) == 0
    assert int(train.load_checkpoint(str(run))["step"]) == stopped + 7
    resumed = [m["step"] for m in train.read_metrics(str(run)) if m["step"] > stopped]
    assert resumed and resumed[-1] == stopped + 7 and resumed[0] > stopped


def test_unset_options_take_the_model_defaults_and_the_run_records_them(tmp_path):
    from trainers.options import MODEL_DEFAULTS

    index = tiny_index(CONTINUOUS, {})
    mlp = train.new_run_config(index, TrainOptions(input="x", output=str(tmp_path / "m")))
    assert mlp.options.model == "mlp"
    assert {k: getattr(mlp.options, k) for k in MODEL_DEFAULTS["mlp"]} == MODEL_DEFAULTS["mlp"]
    assert mlp.model["window"] == 1 and mlp.model["mlp_layers"] == 2
    linears = [m for m in train.build_model(mlp.model).network if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3  # 2 hidden layers and the output

    transformer = train.new_run_config(
        index, TrainOptions(input="x", output=str(tmp_path / "t"), model="transformer")
    )
    assert transformer.model["window"] == WINDOW  # the shards' window
    assert (transformer.options.batch_size, transformer.options.lr) == (64, 3e-4)

    asked = TrainOptions(input="x", output="y", window=2, batch_size=7, lr=0.5, n_layer=4)
    kept = train.new_run_config(index, asked)
    assert (kept.options.batch_size, kept.options.lr, kept.model["window"]) == (7, 0.5, 2)
    assert kept.model["mlp_layers"] == 4
    with pytest.raises(ValueError, match="--window must be between 1 and the shards' window"):
        train.new_run_config(index, TrainOptions(input="x", output="y", window=WINDOW + 1))

    # A run records the values it used, so a resumed run that leaves them unset keeps them.
    assert RunConfig.model_validate_json(mlp.model_dump_json()).options.batch_size == 256
    resumed = train.resumed_config(mlp, TrainOptions(input="x", output=str(tmp_path / "m")))
    assert resumed.options.window == 1 and resumed.options.batch_size == 256
