"""Reading and writing checkpoints: lazy readers and an atomic, streaming sharded writer."""

from mergelab.checkpoint.reader import CheckpointReader, TensorNotFoundError, open_checkpoint
from mergelab.checkpoint.shards import ShardPlan, parse_size, plan_shards
from mergelab.checkpoint.writer import ShardedWriter, ShardFileWriter, ShardLayout, ShardReceipt

__all__ = [
    "CheckpointReader",
    "ShardPlan",
    "ShardedWriter",
    "ShardFileWriter",
    "ShardLayout",
    "ShardReceipt",
    "TensorNotFoundError",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
]
