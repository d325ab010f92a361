"""Sharded initialisation: build a model (or a whole train state) directly in its sharded layout."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh

from ..perf._xla_flags import EAGER_EXACT_OPTIONS
from ._rules import Rules
from ._shard import tree_shardings


def _prepare(fn: Callable[..., Any], args: tuple, kwargs: dict, mesh: Mesh, rules: Rules | None):
    abstract = eqx.filter_eval_shape(fn, *args, **kwargs)  # shapes only, nothing allocated
    leaves, treedef = jax.tree.flatten(abstract)
    targets = treedef.flatten_up_to(tree_shardings(abstract, mesh, rules))
    where = [i for i, s in enumerate(targets) if s is not None]
    dynamic, static = eqx.partition((args, kwargs), eqx.is_array)

    def init(dynamic):
        a, k = eqx.combine(dynamic, static)
        out = jax.tree.leaves(fn(*a, **k))
        return [out[i] for i in where]

    # With out_shardings the compiler partitions the initialisers themselves: each device draws
    # only its own shard (JAX's default threefry PRNG is partitionable), so no device ever holds
    # a whole parameter. The options keep the draws bit-identical to an eager (unsharded) build.
    jitted = jax.jit(init, out_shardings=[targets[i] for i in where], compiler_options=EAGER_EXACT_OPTIONS)
    return jitted, dynamic, leaves, treedef, where


def sharded_init(fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: Rules | None = None, **kwargs: Any) -> Any:
    """Call `fn(*args, **kwargs)` so that its arrays are created directly in their sharded layout.

    The output's shapes come from `eqx.filter_eval_shape` (nothing allocated); its shardings
    from the rules; then `fn` runs under `jax.jit(..., out_shardings=...)`, so each device
    computes only its own shard and no device or host ever holds a whole parameter. Use it for
    models too large for one device, or to build the whole train state at once:

    ```python
    state = sharded_init(
        lambda k: TrainState.create(Llama(config, key=k), optax.adamw(3e-4), key=k),
        jax.random.key(0), mesh=mesh,
    )
    ```

    **Arguments:**

    - `fn`: builds a model, a pytree or a [`eqzoo.train.TrainState`][]; traced once for shapes
      and once for the sharded computation.
    - `*args`, `**kwargs`: passed to `fn`; their arrays (e.g. PRNG keys) are traced inputs,
      everything else is static.
    - `mesh`: from [`eqzoo.sharding.make_mesh`][].
    - `rules`: sharding rules; default [`eqzoo.sharding.default_rules`][] of the result.

    **Returns:** what `fn` returns, with every array sharded on `mesh`.

    **Raises:** [`eqzoo.sharding.ShardingError`][] when a rule does not fit a parameter.
    """
    jitted, dynamic, leaves, treedef, where = _prepare(fn, args, kwargs, mesh, rules)
    arrays = jitted(dynamic)
    leaves = list(leaves)
    for i, a in zip(where, arrays, strict=True):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)


def lower_sharded_init(
    fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: Rules | None = None, **kwargs: Any
) -> jax.stages.Lowered:
    """The lowered sharded initialisation [`eqzoo.sharding.sharded_init`][] would run.

    Compile it to check per-device memory before allocating anything:
    `lower_sharded_init(...).compile().memory_analysis()` (output and temporary bytes *per
    device*).

    **Arguments:** as for `sharded_init`. **Returns:** a `jax.stages.Lowered`.
    """
    jitted, dynamic, *_ = _prepare(fn, args, kwargs, mesh, rules)
    return jitted.lower(dynamic)
