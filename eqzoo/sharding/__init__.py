"""Scaling out with JAX's own engine: meshes, path-based sharding rules, sharded state and
batches, sharded initialisation, activation constraints and multi-host start-up.

Everything here builds on `jax.sharding.Mesh`, `NamedSharding`, `with_sharding_constraint` and
`jax.distributed`; eqzoo adds no communication layer of its own.
"""

from ._activation import (
    ACTIVATION_RULES as ACTIVATION_RULES,
    CONTEXT_ATTENTION as CONTEXT_ATTENTION,
    ContextAttention as ContextAttention,
    activation_sharding as activation_sharding,
    active_context_attention as active_context_attention,
    active_mesh as active_mesh,
    active_pipeline_microbatches as active_pipeline_microbatches,
    active_pipeline_repeats as active_pipeline_repeats,
    batch_axes as batch_axes,
    batch_vmap as batch_vmap,
    constrain as constrain,
)
from ._distributed import (
    DistributedArgs as DistributedArgs,
    initialize as initialize,
    resolve_distributed_args as resolve_distributed_args,
    slurm_first_host as slurm_first_host,
)
from ._errors import ShardingError as ShardingError
from ._init import lower_sharded_init as lower_sharded_init, sharded_init as sharded_init
from ._mesh import (
    AXES as AXES,
    SEQUENCE_KEYS as SEQUENCE_KEYS,
    make_mesh as make_mesh,
    mesh_shape as mesh_shape,
    parse_mesh_shape as parse_mesh_shape,
)
from ._rules import (
    DIT_RULES as DIT_RULES,
    GPT2_RULES as GPT2_RULES,
    LLAMA_RULES as LLAMA_RULES,
    MIXTRAL_RULES as MIXTRAL_RULES,
    VIT_RULES as VIT_RULES,
    Rules as Rules,
    check_spec as check_spec,
    default_rules as default_rules,
    partition_specs as partition_specs,
    path_str as path_str,
    spec_for as spec_for,
)
from ._shard import (
    BATCH_SPEC as BATCH_SPEC,
    abstract_sharded as abstract_sharded,
    batch_spec as batch_spec,
    make_global_batch as make_global_batch,
    shard as shard,
    shard_batch as shard_batch,
    shard_state as shard_state,
    tree_shardings as tree_shardings,
)

__all__ = [
    "ACTIVATION_RULES",
    "AXES",
    "BATCH_SPEC",
    "CONTEXT_ATTENTION",
    "ContextAttention",
    "DistributedArgs",
    "GPT2_RULES",
    "LLAMA_RULES",
    "MIXTRAL_RULES",
    "VIT_RULES",
    "DIT_RULES",
    "Rules",
    "SEQUENCE_KEYS",
    "ShardingError",
    "abstract_sharded",
    "activation_sharding",
    "active_context_attention",
    "active_mesh",
    "active_pipeline_microbatches",
    "active_pipeline_repeats",
    "batch_axes",
    "batch_spec",
    "batch_vmap",
    "check_spec",
    "constrain",
    "default_rules",
    "initialize",
    "lower_sharded_init",
    "make_global_batch",
    "make_mesh",
    "mesh_shape",
    "parse_mesh_shape",
    "partition_specs",
    "path_str",
    "resolve_distributed_args",
    "shard",
    "shard_batch",
    "shard_state",
    "sharded_init",
    "slurm_first_host",
    "spec_for",
    "tree_shardings",
]
