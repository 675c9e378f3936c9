#!/usr/bin/env bash
# Make (or reuse) the side environment with the real LeRobot for the slow tests and
# bench/lerobot.py; print its directory on the last line of stdout.
#
#   PYTHON=.venv/bin/python tests/lerobot_env/make_env.sh      # or: make lerobot-env
#
# The environment is a venv of the project's python that also sees the project's site-packages
# (torch, pyarrow, av...) through a .pth file, plus pins.txt installed with --no-deps, so it
# never changes or downloads torch. Directory: $HINDSIGHT_CACHE (default ~/.cache/hindsight)/
# lerobot-env-<hash of pins.txt, this script and the project python>; made in a temporary
# directory and renamed when complete, so a half-made one is never reused.
# Run scripts in it with $ENV/run SCRIPT.py ...: it sets LD_LIBRARY_PATH for FFmpeg and
# HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.
# Exit status 3: pip could not download the pinned packages (no index reachable).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
purelib="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! avlibs="$("$python" -c 'import av, pathlib; print(pathlib.Path(av.__file__).parent.parent / "av.libs")')"; then
    echo "PyAV is not installed in $python's environment (pip install -e '.[video]')" >&2
    exit 1
fi
key="$(cat "$here/pins.txt" "$here/make_env.sh" <(echo "$purelib") | sha256sum | cut -c1-12)"
cache="${HINDSIGHT_CACHE:-$HOME/.cache/hindsight}"
env_dir="$cache/lerobot-env-$key"
if [[ -f "$env_dir/.complete" ]]; then
    echo "$env_dir"
    exit 0
fi
mkdir -p "$cache"
start=$(date +%s.%N)
tmp="$(mktemp -d "$cache/.lerobot-env-$key.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv --without-pip "$tmp"
# The side environment's own site-packages come first on sys.path, the project's after it (the
# .pth): its pins shadow the project's (numpy, fsspec), everything else is the project's copy.
sitedir="$("$tmp/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$purelib" > "$sitedir/_hindsight_project.pth"
mkdir "$tmp/wheels"
if ! "$python" -m pip download -q --no-deps --only-binary=:all: -r "$here/pins.txt" \
        -d "$tmp/wheels" >&2; then
    echo "pip could not download the pinned LeRobot packages (pins.txt)" >&2
    exit 3
fi
download_mb=$(du -sm "$tmp/wheels" | cut -f1)
"$python" -m pip --python "$tmp/bin/python" install -q --no-deps --no-index \
    --no-compile --find-links "$tmp/wheels" -r "$here/pins.txt" >&2
rm -rf "$tmp/wheels"
# torchcodec loads FFmpeg by its usual names (libavcodec.so.62...); PyAV's wheel ships FFmpeg 8
# under mangled names: links with the usual names let torchcodec use those same libraries.
mkdir "$tmp/ffmpeg"
for lib in "$avlibs"/libav*.so.* "$avlibs"/libsw*.so.*; do
    base="$(basename "$lib")"
    major="$(echo "$base" | sed -E 's/.*\.so\.([0-9]+).*/\1/')"
    ln -s "$lib" "$tmp/ffmpeg/${base%%-*}.so.$major"
done
cat > "$tmp/run" <<RUN
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$env_dir/ffmpeg:$avlibs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$env_dir/bin/python" "\$@"
RUN
chmod +x "$tmp/run"
# A venv may move (its python finds pyvenv.cfg next to itself); `run` already names the final
# directory. A leftover without .complete is an interrupted earlier attempt; one with it was
# finished meanwhile by another run: use that one.
if [[ -f "$env_dir/.complete" ]]; then
    echo "$env_dir"
    exit 0
fi
rm -rf "$env_dir"
mv "$tmp" "$env_dir"
trap 'rm -rf "$env_dir"' EXIT
if ! HF_HOME="$env_dir/.hf-home" "$env_dir/run" -c "
import sys; sys.path.insert(0, '$here'); import side; side.prepare()
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from torchcodec.decoders import VideoDecoder
" >&2; then
    echo "the LeRobot side environment in $env_dir does not import" >&2
    exit 1
fi
rm -rf "$env_dir/.hf-home"
seconds=$(echo "$(date +%s.%N) - $start" | bc)
size_mb=$(du -sm "$env_dir" | cut -f1)
printf 'made %s in %.0f s: %s MB of wheels downloaded, %s MB on disk\n' \
    "$env_dir" "$seconds" "$download_mb" "$size_mb" >&2
touch "$env_dir/.complete"
trap - EXIT
echo "$env_dir"
