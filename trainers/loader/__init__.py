"""The streaming loader: WebDataset shards (engine/shards/) -> batches of training windows.

    from trainers.loader import read_index, stream
    index = read_index("s3://bucket/shards/pendulum-v3")          # schemas.shard_index.ShardIndex
    loader = stream("s3://bucket/shards/pendulum-v3", batch_size=256, condition="return_to_go",
                    num_workers=2)
    for batch in loader: ...                                      # dict of torch tensors
    state = loader.state_dict()                                   # checkpoint it
    loader = stream(..., start_state=state)                       # resume exactly there

`stream(uri, batch_size, condition=None | "col" | ["col", ...], *, shuffle_buffer=65536,
seed=0, rank=0, world_size=1, num_workers=0, epochs=None (forever), start_state=None,
drop_last=False, on_error="raise" | "skip", pin_memory=False,
multiprocessing_context=None (DataLoader's; "forkserver" where the process has threads that
make fork unsafe), window=None (steps per window, at most the index's: 1 gives single steps,
each step of the shards once per epoch with stride 1), prefetch=0 (batches made ahead in a
background thread, with num_workers=0: loading overlaps the training step),
cameras=None (the cameras whose frames batches carry; None: every camera of the shards,
[]: none),
frame_stack=None (frames stacked per step, at most the shards'; None: the shards'),
augment_shift=0 (DrQ random shift in pixels: pad by replication, crop back at a seeded
random offset per window), decode_threads=0 (threads decoding frames in each consumer),
frame_cache_mb=1024 (decoded frames kept by block for later batches and epochs, per rank:
its DataLoader workers split it; 0: decode every batch's frames afresh; the batches are
the same bytes either way))` returns a
`ShardStream`; `read_index(uri)` refuses a directory without a
committed index.json.

A batch is a dict of torch tensors (B = batch size, W = window):
    observation  float32 [B, W, obs_dim]          (0 on padding; obs_dim 0: pixels-only shards)
    action       float32 [B, W, act_dim] (continuous) or int64 [B, W] (discrete)
    reward       float32 [B, W]
    timestep     int64   [B, W]                    t within the episode
    mask         bool    [B, W]                    False on left padding at episode start
    episode_id   int64   [B]                       the episode each window comes from
    one entry per requested condition column, named as the column:
      scalar      float32 [B, W]       raw (normalize with the index's mean/std)
      vector      float32 [B, W, D]    for k goals per step (hindsight_goal) one of the k is
                                       picked per window, seeded
      categorical int64   [B, W]       index into the index's vocabulary
      text        int64   [B, L]       token ids of the text at the window's last step (0-padded);
                                       for a list of texts one is picked per window, seeded
    frame_<camera> uint8 [B, W, C * k, H, W]  per camera of shards with frames: the frames
                                       of the step and the k - 1 before it, oldest first
                                       (channels first; before an episode's first step its
                                       first frame repeats; 0 on padding); normalize on the
                                       device. A frame that does not decode is a ShardError
                                       naming shard and sample, or with on_error="skip" its
                                       windows are left out and counted in lost_windows
The last batch of an epoch of each (rank, worker) may be smaller unless drop_last.

The pipeline is a chain of small generator stages, each testable alone, in three modules:
    stream.py   epoch_shards (seeded shard order per epoch, split by rank and DataLoader
                worker) -> epoch_blocks (each shard in turn; a bad one raises or is skipped)
    shards.py   -> open_shard (engine/storage: local file or S3 through pyarrow.fs, resumed
                where it stopped if the connection drops, no temp copies) -> tar expansion
                (tar_members: each member's size bounded by the index before it is read;
                webdataset's group_by_keys) -> checked_members (only
                .npy/.json/.txt, no path outside the shard) -> decode_block (np arrays, never
                unpickled)
    windows.py  -> pools (the shuffle buffer: `shuffle_buffer` windows) -> pool_batches (a
                seeded permutation of the pool, windows cut vectorized with left padding and
                a mask)
    frames.py   -> the frames each batch needs, decoded (threads) and stacked
    handover.py -> in DataLoader workers, frames gathered into recycled shared memory
Every consumer (rank r, worker w of W) reads the shards at positions r * W + w, (r * W + w) +
R * W, ... of the epoch's shard order, so across R ranks x W workers each window is seen
exactly once per epoch. Use at least R x W shards (fewer leaves some consumers idle).

Resuming: every batch carries its consumer's position (epoch, shard, offset = block within
the shard, window within the block, pool, batch within the pool); pools and their permutations
are deterministic, so `start_state` resumes at exactly the next batch each worker would have
produced. A state is valid for the same seed, world size, workers, batch and buffer sizes.

Errors: a truncated or corrupt shard, or one whose size and sha256 (checked when its last
block has been read) differ from the index's, is a `ShardError` naming the shard; with
on_error="skip" a warning, and `lost_windows` in the state counts what was lost. S3 reads
that drop are retried from the byte where they stopped (schemas/retry.py's policy). Pickle
members and names outside the shard are always refused, and so is an intact shard whose
window lengths, window count, observation/action shapes or condition values are not what
index.json says (`IndexMismatchError`: the index is wrong, so no shard is skipped).
"""

from schemas.shard_index import ShardError
from trainers.loader.frames import FrameDecoder, PoolFrames, random_shift, stack_rows
from trainers.loader.shards import (
    Block,
    IndexMismatchError,
    UnsafeShardError,
    decode_block,
    open_shard,
    read_index,
    read_shard_bytes,
    shard_blocks,
)
from trainers.loader.stream import (
    ShardStream,
    StreamOptions,
    WindowDataset,
    epoch_blocks,
    epoch_shards,
    stream,
)
from trainers.loader.windows import (
    FrameOptions,
    LostWindows,
    PlacedBlock,
    Pool,
    PoolArrays,
    Position,
    cut_windows,
    pool_arrays,
    pool_batches,
    pools,
)

__all__ = [
    "Block",
    "FrameDecoder",
    "FrameOptions",
    "IndexMismatchError",
    "LostWindows",
    "PlacedBlock",
    "Pool",
    "PoolArrays",
    "PoolFrames",
    "Position",
    "ShardError",
    "ShardStream",
    "StreamOptions",
    "UnsafeShardError",
    "WindowDataset",
    "cut_windows",
    "decode_block",
    "epoch_blocks",
    "epoch_shards",
    "open_shard",
    "pool_arrays",
    "pool_batches",
    "pools",
    "random_shift",
    "read_index",
    "read_shard_bytes",
    "shard_blocks",
    "stack_rows",
    "stream",
]
