"""Return-to-go kernel against the obvious loops and TorchRL, on the same data, same run.

    python -m bench.returns --out bench/results/returns.json [--steps 2000000] [--rounds 7]

Data (float32 rewards ~ N(0, 1), seeded), each about `--steps` steps:
- short: 40,000 episodes of 50 steps (at the default size);
- issue: episodes of 50-1,000 steps (uniform), the data of issue 18;
- long: episodes of 1,000-100,000 steps (uniform).

For gamma 0.99 and 1, timed in turns (the order rotates every round), best of `--rounds`,
wall clock and CPU time of this process (the CPU time is less disturbed by other processes
on a shared machine):
- kernel: `discounted_reverse_cumsum` on the whole array;
- kernel in parts: the same, called part by part on ~1M-step parts cut at episode ends, as
  the relabel job runs it;
- numpy loop: the per-episode NumPy code people write, `np.cumsum(r[::-1])[::-1]` for
  gamma = 1 and the gamma^t trick `cumsum((r * d)[::-1])[::-1] / d`, d = gamma**t, for
  gamma < 1 (which loses precision on long episodes and overflows past t ~ 70k: its error
  is recorded too);
- lfilter loop: `scipy.signal.lfilter([1], [1, -gamma], r[::-1])[::-1]` per episode;
- whole array minus carry (rejected: not exact): one recurrence over the whole array
  across episode ends (lfilter, or cumsum for gamma = 1), the carry then subtracted;
- torchrl: `torchrl.objectives.value.functional.reward2go` on the episodes that fit its
  memory (it pads every episode to the longest and convolves with a gamma^t kernel, about
  episodes x longest x kernel x 8 bytes), with torch's default threads and with one, the
  kernel (one thread) timed on the same episodes.

Ratios are kernel speed / baseline speed (> 1: the kernel is faster). Exactness: the kernel
against a plain backward loop (bit for bit: the number of differing steps), and every
baseline's largest error relative to the largest |return-to-go|. Episodes of BLOCKED_FROM
steps or more take the blocked scan, which rounds in another order than the loop: `exactness`
gives the kernel's and the loop's errors against an exact reference (the recursion in x86
extended precision, 11 bits more than float64), each step's error relative to its episode's
largest |return-to-go|, on the float32 rewards, on float64 N(0, 1) rewards, and on float64
rewards spread over eight orders of magnitude (N(0, 1) times 1e-4, 1 or 1e4).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable

import numpy as np
from scipy.signal import lfilter

from bench import save_results
from relabelers.returns import BLOCKED_FROM, discounted_reverse_cumsum

GAMMAS = (0.99, 1.0)
PART_STEPS = 1_000_000
TORCHRL_MEMORY = 2 << 30  # bytes TorchRL's reward2go may use (its own estimate, see above)


# ---------------------------------------------------------------- data


def episode_lengths(kind: str, steps: int, rng: np.random.Generator) -> np.ndarray:
    low, high = {"short": (50, 50), "issue": (50, 1_000), "long": (1_000, 100_000)}[kind]
    lengths = rng.integers(low, high + 1, size=2 * steps // low + 1)
    return lengths[: int(np.searchsorted(np.cumsum(lengths), steps)) + 1]


def dataset(kind: str, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rewards (float32, as stored) and the last step of each episode."""
    rng = np.random.default_rng(seed)
    lengths = episode_lengths(kind, steps, rng)
    rewards = rng.standard_normal(int(lengths.sum()), dtype=np.float32)
    return rewards, np.cumsum(lengths) - 1


# ---------------------------------------------------------------- the ways


def episode_ends_mask(size: int, ends: np.ndarray) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[ends] = True
    return mask


# Every way gets the same input: rewards and a mask of the last step of each episode (what
# a part's episode ids give), so finding the episodes is part of every way's time.


def kernel(rewards: np.ndarray, is_end: np.ndarray, gamma: float) -> np.ndarray:
    return discounted_reverse_cumsum(rewards, is_end, gamma)


def kernel_in_parts(rewards: np.ndarray, is_end: np.ndarray, gamma: float) -> list[np.ndarray]:
    """Part by part, each ending at the first episode end past PART_STEPS steps; like the
    job, each part's result stays its own array."""
    results = []
    low = 0
    while low < len(rewards):
        high = min(low + PART_STEPS, len(rewards))
        high += int(np.argmax(is_end[high - 1 :])) if not is_end[high - 1] else 0
        results.append(kernel(rewards[low:high], is_end[low:high], gamma))
        low = high
    return results


def numpy_loop(rewards: np.ndarray, is_end: np.ndarray, gamma: float) -> np.ndarray:
    ends = np.flatnonzero(is_end)
    values = rewards.astype(np.float64)
    out = np.empty(len(values))
    starts = np.concatenate([[0], ends[:-1] + 1])
    for start, end in zip(starts.tolist(), (ends + 1).tolist()):
        episode = values[start:end]
        if gamma == 1.0:
            out[start:end] = np.cumsum(episode[::-1])[::-1]
        else:
            discounts = gamma ** np.arange(end - start)
            out[start:end] = np.cumsum((episode * discounts)[::-1])[::-1] / discounts
    return out


def lfilter_loop(rewards: np.ndarray, is_end: np.ndarray, gamma: float) -> np.ndarray:
    ends = np.flatnonzero(is_end)
    values = rewards.astype(np.float64)
    out = np.empty(len(values))
    starts = np.concatenate([[0], ends[:-1] + 1])
    for start, end in zip(starts.tolist(), (ends + 1).tolist()):
        out[start:end] = lfilter([1.0], [1.0, -gamma], values[start:end][::-1])[::-1]
    return out


def whole_array_minus_carry(rewards: np.ndarray, is_end: np.ndarray, gamma: float) -> np.ndarray:
    """Rejected (not exact): one recurrence over the whole array, across episode ends, then
    the carry removed: y[i] - gamma^(end + 1 - i) * y[end + 1]. For gamma = 1 that is the
    reversed cumsum minus the running total at the next episode's start."""
    ends = np.flatnonzero(is_end)
    values = rewards.astype(np.float64)
    if gamma == 1.0:
        through = np.cumsum(values[::-1])[::-1]
    else:
        through = lfilter([1.0], [1.0, -gamma], values[::-1])[::-1]
    carry = np.append(through, 0.0)[ends + 1]
    lengths = np.diff(np.concatenate([[-1], ends]))
    if gamma == 1.0:
        return through - np.repeat(carry, lengths)
    span = np.repeat(ends + 1, lengths) - np.arange(len(values))
    return through - gamma**span * np.repeat(carry, lengths)


def backward_loop(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> np.ndarray:
    """The textbook loop, in Python floats: the reference for exactness."""
    values = rewards.astype(np.float64).tolist()
    out = [0.0] * len(values)
    is_end = set(ends.tolist())
    running = 0.0
    for index in range(len(values) - 1, -1, -1):
        if index in is_end:
            running = 0.0
        running = values[index] + gamma * running
        out[index] = running
    return np.array(out)


def exact_return_to_go(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> np.ndarray | None:
    """The recursion per episode in extended precision (64-bit mantissa on x86), exact to
    far below float64's rounding; None where long double is no wider than float64."""
    if np.finfo(np.longdouble).nmant < 63:
        return None
    values = rewards.astype(np.longdouble)
    out = np.empty(len(values), dtype=np.longdouble)
    one = np.array([1.0], dtype=np.longdouble)
    denominator = np.array([1.0, -gamma], dtype=np.longdouble)
    starts = np.concatenate([[0], ends[:-1] + 1])
    for start, end in zip(starts.tolist(), (ends + 1).tolist()):
        out[start:end] = lfilter(one, denominator, values[start:end][::-1])[::-1]
    return out


def error_of_episode_largest(got: np.ndarray, reference: np.ndarray, ends: np.ndarray) -> float:
    """The largest |error| of a step relative to its episode's largest |return-to-go|."""
    starts = np.concatenate([[0], ends[:-1] + 1])
    largest = np.maximum.reduceat(np.abs(reference), starts).astype(np.float64)
    error = np.abs(got - reference).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = error / np.repeat(largest, np.diff(np.append(starts, len(got))))
    relative = relative[np.repeat(largest, np.diff(np.append(starts, len(got)))) > 0]
    return float(relative.max()) if len(relative) else 0.0


def exactness(
    rewards: np.ndarray, ends: np.ndarray, gamma: float, loop: np.ndarray | None = None
) -> dict:
    """The kernel and the backward loop (`loop`, if already computed) against the exact
    reference; the steps where the kernel and the loop differ, and how many of those lie
    outside blocked episodes (0: the exact ways keep the loop's bits)."""
    is_end = episode_ends_mask(len(rewards), ends)
    got = kernel(rewards, is_end, gamma)
    loop = backward_loop(rewards, ends, gamma) if loop is None else loop
    lengths = np.diff(np.concatenate([[-1], ends]))
    blocked = np.repeat(lengths >= BLOCKED_FROM, lengths)
    result: dict = {
        "steps_differing_from_backward_loop": int(np.count_nonzero(got != loop)),
        "steps_differing_outside_blocked_episodes": int(
            np.count_nonzero(got[~blocked] != loop[~blocked])
        ),
        "kernel_vs_backward_loop": error_of_episode_largest(got, loop, ends),
    }
    exact = exact_return_to_go(rewards, ends, gamma)
    if exact is not None:
        result["kernel_vs_exact"] = error_of_episode_largest(got, exact, ends)
        result["backward_loop_vs_exact"] = error_of_episode_largest(loop, exact, ends)
    return result


def torchrl_way() -> Callable | None:
    try:
        import torch
        from torchrl.objectives.value.functional import reward2go
    except ImportError:
        return None

    def torchrl(rewards: np.ndarray, is_end: np.ndarray, gamma: float) -> np.ndarray:
        reward = torch.from_numpy(rewards.astype(np.float64)).reshape(1, -1)
        done = torch.from_numpy(is_end).reshape(1, -1)
        return reward2go(reward, done, gamma, time_dim=-1).numpy().reshape(-1)

    return torchrl


def torchrl_episodes(ends: np.ndarray, gamma: float) -> int:
    """How many episodes (from the first) fit TORCHRL_MEMORY in reward2go."""
    lengths = np.diff(np.concatenate([[-1], ends]))
    longest = np.maximum.accumulate(lengths)
    # Its kernel is gamma^t up to 1e-7 (the whole episode for gamma = 1).
    width = longest if gamma == 1.0 else np.minimum(longest, int(np.log(1e-7) / np.log(gamma)))
    need = np.arange(1, len(lengths) + 1) * longest * width * 8.0
    return int(np.searchsorted(need, TORCHRL_MEMORY, side="right"))


# ---------------------------------------------------------------- timing


def race(ways: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU seconds of each way, the ways taking turns in a rotating order."""
    best = {name: {"wall_s": float("inf"), "cpu_s": float("inf")} for name in ways}
    names = list(ways)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            ways[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name]["wall_s"] = min(best[name]["wall_s"], wall)
            best[name]["cpu_s"] = min(best[name]["cpu_s"], cpu)
    return best


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        error = np.abs(got - expected).max() / np.abs(expected).max()
    return float(error) if np.isfinite(error) else float("inf")


def errors(got: np.ndarray, expected: np.ndarray) -> dict:
    """Against the backward loop: the largest error relative to the largest |return-to-go|,
    the largest relative to the step's own |return-to-go|, and the steps not identical."""
    with np.errstate(invalid="ignore", divide="ignore"):
        own = np.abs(got - expected) / np.abs(expected)
    own = own[expected != 0]
    return {
        "relative_to_largest": relative_error(got, expected),
        "relative_to_own_largest": float(own.max()) if np.isfinite(own).all() else float("inf"),
        "non_finite_steps": int(np.count_nonzero(~np.isfinite(got))),
        "steps_differing": int(np.count_nonzero(got != expected)),
    }


def compare(
    rewards: np.ndarray, ends: np.ndarray, gamma: float, rounds: int, torchrl: Callable | None
) -> dict:
    steps = len(rewards)
    is_end = episode_ends_mask(steps, ends)
    expected = backward_loop(rewards, ends, gamma)
    got = kernel(rewards, is_end, gamma)
    result: dict = {
        "episodes": len(ends),
        "steps": steps,
        "kernel_steps_differing_from_backward_loop": int(np.count_nonzero(got != expected)),
        "kernel_in_parts_identical": bool(
            np.array_equal(np.concatenate(kernel_in_parts(rewards, is_end, gamma)), got)
        ),
    }
    # Sums of float32 rewards are often exact in float64; float64 rewards show the rounding.
    wide = np.random.default_rng(steps).standard_normal(steps)
    wide_expected = backward_loop(wide, ends, gamma)
    result["on_float64_rewards"] = {
        "kernel_steps_differing_from_backward_loop": int(
            np.count_nonzero(kernel(wide, is_end, gamma) != wide_expected)
        ),
        "whole_array_minus_carry": errors(
            whole_array_minus_carry(wide, is_end, gamma), wide_expected
        ),
    }
    lengths = np.diff(np.concatenate([[-1], ends]))
    spread = wide * np.random.default_rng(steps + 1).choice([1e-4, 1.0, 1e4], steps)
    result["exactness"] = {
        "blocked_from": BLOCKED_FROM,
        "blocked_episodes": int(np.count_nonzero(lengths >= BLOCKED_FROM)),
        "blocked_steps": int(lengths[lengths >= BLOCKED_FROM].sum()),
        "errors_relative_to": "the episode's largest |return-to-go|",
        "float32_rewards": exactness(rewards, ends, gamma, expected),
        "float64_rewards": exactness(wide, ends, gamma, wide_expected),
        "float64_spread_rewards": exactness(spread, ends, gamma),
    }
    ways = {
        "kernel": lambda: kernel(rewards, is_end, gamma),
        "kernel_in_parts": lambda: kernel_in_parts(rewards, is_end, gamma),
        "numpy_loop": lambda: numpy_loop(rewards, is_end, gamma),
        "lfilter_loop": lambda: lfilter_loop(rewards, is_end, gamma),
        "whole_array_minus_carry": lambda: whole_array_minus_carry(rewards, is_end, gamma),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the gamma^t trick overflows
        result["error"] = {
            name: errors(way(rewards, is_end, gamma), expected)
            for name, way in (
                ("numpy_loop", numpy_loop),
                ("lfilter_loop", lfilter_loop),
                ("whole_array_minus_carry", whole_array_minus_carry),
            )
        }
        timings = race(ways, rounds)
    result["steps_per_s"] = {name: round(steps / t["wall_s"]) for name, t in timings.items()}
    result["seconds"] = timings
    for clock in ("wall_s", "cpu_s"):
        suffix = "" if clock == "wall_s" else "_cpu"
        for way in ("kernel", "kernel_in_parts"):
            for baseline in ("numpy_loop", "lfilter_loop"):
                result[f"{way}_vs_{baseline}{suffix}"] = round(
                    timings[baseline][clock] / timings[way][clock], 2
                )
    result["torchrl"] = torchrl_result(rewards, ends, gamma, rounds, torchrl)
    return result


def torchrl_result(
    rewards: np.ndarray, ends: np.ndarray, gamma: float, rounds: int, torchrl: Callable | None
) -> dict:
    if torchrl is None:
        return {"measured": False, "why": "torchrl is not installed"}
    count = torchrl_episodes(ends, gamma)
    if count == 0:
        lengths = np.diff(np.concatenate([[-1], ends]))
        width = lengths[0] if gamma == 1.0 else min(lengths[0], int(np.log(1e-7) / np.log(gamma)))
        return {
            "measured": False,
            "why": f"reward2go needs ~{lengths[0] * width * 8 / 2**30:.0f} GiB for the first "
            f"episode alone ({lengths[0]} steps; limit {TORCHRL_MEMORY / 2**30:.0f} GiB)",
        }
    subset_ends = ends[:count]
    subset = rewards[: int(subset_ends[-1]) + 1]
    subset_is_end = episode_ends_mask(len(subset), subset_ends)
    import torch

    threads = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            torchrl(subset, subset_is_end, gamma)
        finally:
            torch.set_num_threads(threads)

    timings = race(
        {
            "kernel": lambda: kernel(subset, subset_is_end, gamma),
            "torchrl": lambda: torchrl(subset, subset_is_end, gamma),
            "torchrl_one_thread": one_thread,
        },
        max(3, rounds // 2),
    )
    fastest = min(timings["torchrl"]["wall_s"], timings["torchrl_one_thread"]["wall_s"])
    return {
        "measured": True,
        "episodes": count,
        "steps": len(subset),
        "relative_error": relative_error(
            torchrl(subset, subset_is_end, gamma), kernel(subset, subset_is_end, gamma)
        ),
        "steps_per_s": {
            f"torchrl_{threads}_threads": round(len(subset) / timings["torchrl"]["wall_s"]),
            "torchrl_1_thread": round(len(subset) / timings["torchrl_one_thread"]["wall_s"]),
            "kernel": round(len(subset) / timings["kernel"]["wall_s"]),
        },
        # Against TorchRL's faster setting; the kernel runs on one thread.
        "kernel_vs_torchrl": round(fastest / timings["kernel"]["wall_s"], 1),
        "kernel_vs_torchrl_1_thread_cpu": round(
            timings["torchrl_one_thread"]["cpu_s"] / timings["kernel"]["cpu_s"], 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2_000_000, help="steps per data set")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (best of)")
    parser.add_argument("--data", default="short,issue,long", help="data sets to run")
    parser.add_argument("--out", default="bench/results/returns.json")
    args = parser.parse_args()

    torchrl = torchrl_way()
    results: dict = {
        "config": {
            "steps": args.steps,
            "rounds": args.rounds,
            "part_steps": PART_STEPS,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "processor": platform.processor(),
            "numpy": np.__version__,
            "scipy": __import__("scipy").__version__,
            "torchrl": __import__("torchrl").__version__ if torchrl else None,
            "load_average_before": os.getloadavg(),
        },
    }
    for index, kind in enumerate(args.data.split(",")):
        rewards, ends = dataset(kind, args.steps, seed=index)
        for gamma in GAMMAS:
            started = time.perf_counter()
            result = compare(rewards, ends, gamma, args.rounds, torchrl)
            results[f"{kind}_gamma_{gamma:g}"] = result
            ratios = ", ".join(
                f"x {baseline} {result[f'{way}_vs_{baseline}']} (cpu "
                f"{result[f'{way}_vs_{baseline}_cpu']})"
                for way in ("kernel", "kernel_in_parts")
                for baseline in ("numpy_loop", "lfilter_loop")
            )
            print(
                f"{kind} gamma={gamma:g}: {result['episodes']} episodes, kernel "
                f"{result['steps_per_s']['kernel'] / 1e6:.0f}M steps/s; kernel, then in parts: "
                f"{ratios}; x torchrl {result['torchrl'].get('kernel_vs_torchrl', '-')}; "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    results["config"]["load_average_after"] = os.getloadavg()
    save_results(results, args.out, echo=False)


if __name__ == "__main__":
    main()
