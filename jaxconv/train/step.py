r"""Training: a jitted pure SGD step, evaluation, and data parallelism on a device mesh.

The objective (docs/losses.md, The training objective): mean cross-entropy of the softmax over a mini-batch,
plus an optional L2 term,

.. math::

    J(\theta) = \frac{1}{|B|} \sum_{(x, y) \in B} -\log \mathrm{softmax}(f_\theta(x))_y
                + \lambda \sum_{w \in \theta} \lVert w \rVert^2 ,

computed with :func:`jaxconv.softmax_cross_entropy` and :func:`jaxconv.l2_penalty`
(hand rules), so ``jax.grad`` of ``J`` runs only jaxconv's ``custom_vjp`` rules.

Any optax ``GradientTransformation`` is accepted; :func:`default_optimizer` is SGD
with heavy-ball momentum and weight decay *added to the gradient* (coupled, the
classic ``g + wd * w`` before momentum, i.e. an L2 term of ``wd / 2``).

Data parallel (JAX's own engine, GSPMD): :func:`make_mesh` builds a 1-D
``jax.sharding.Mesh`` over the axis ``"batch"``; with ``mesh=`` the step is
jitted with the batch's leading axis sharded over it (``NamedSharding(mesh,
P("batch"))``) and params and optimizer state replicated (``P()``).  XLA inserts
the all-reduce of the gradient means; the result equals the one-device step up
to the order of floating-point additions.  Several hosts: call
``jax.distributed.initialize()`` in each process first; ``jax.devices()`` then
lists every host's devices and the same code runs, each process feeding its
addressable shard (see the README).

Deterministic: for a given seed, the parameters (:func:`init_params`), the
batch order (:func:`epoch_batches`) and XLA CPU's arithmetic are all fixed, so
two runs give bit-identical parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..nn import layers as nn
from ..ops import losses

__all__ = [
    "DEFAULTS",
    "all_finite",
    "OPTIMIZERS",
    "SCHEDULES",
    "default_optimizer",
    "evaluate",
    "init_optimizer",
    "init_params",
    "RECIPES",
    "augment_images",
    "build_optimizer",
    "split_validation",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "nonfinite_leaves",
    "replicate",
    "shard_batch",
    "standardization",
    "standardize",
]

#: The command line's default recipe per data set (``python -m jaxconv train --dataset NAME``),
#: each of which learns without tuning: it leaves chance within the first epoch and reaches
#: high accuracy in its epochs on a 2-core CPU.  ResNet with batch normalisation, Adam with a
#: cosine decay, mini-batches of 32 (on 2 CPU cores as fast per image as 64, with twice the
#: steps), 10% of the training set held out for validation (the best-on-validation checkpoint
#: is kept).  Measured figures: README, "Train on MNIST / CIFAR-10".
#: ``tests/test_cli_recipes.py`` checks each on realistic check data in the real file formats
#: (:mod:`jaxconv.train.synthetic`): the first epoch leaving chance and the whole recipe (>= 97%), both
#: with ``pytest -m slow``.
_BASE_RECIPE = {
    "model": "resnet_small",
    "epochs": 8,
    "batch_size": 32,
    "optimizer": "adam",
    "learning_rate": 3e-3,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "l2": 0.0,
    "val_fraction": 0.1,
    "augment": False,
    "seed": 0,
}
RECIPES = {
    "digits": dict(_BASE_RECIPE),
    "mnist": dict(_BASE_RECIPE),
    "fashion-mnist": dict(_BASE_RECIPE),
    "cifar10": dict(_BASE_RECIPE, epochs=10),
}

#: The recipe of the bundled 8x8 digits, the command line's default data set.
DEFAULTS = RECIPES["digits"]


def standardization(train_images) -> tuple[float, float]:
    """The scalar ``(mean, std)`` of ``train_images`` that :func:`standardize` uses.

    Saved in the CLI's checkpoints, so that a checkpoint alone is enough to
    prepare new images the way the model saw its training images.
    """
    train_images = np.asarray(train_images, np.float32)
    mean, std = float(train_images.mean(dtype=np.float64)), float(train_images.std(dtype=np.float64))
    if not (math.isfinite(mean) and std > 0 and math.isfinite(std)):
        raise ValueError(f"`train_images` have mean {mean!r} and standard deviation {std!r}; cannot standardise.")
    return mean, std


def standardize(train_images, *other_images, stats: tuple[float, float] | None = None):
    """``(x - mean) / std`` with the scalar mean and std of ``train_images``, applied to every argument.

    ``stats=(mean, std)`` uses those instead (e.g. the ones a checkpoint was
    trained with); then ``train_images`` is only standardised, not measured.
    Returns a tuple of float32 arrays, ``train_images`` first.
    """
    mean, std = standardization(train_images) if stats is None else (float(stats[0]), float(stats[1]))
    if not (math.isfinite(mean) and std > 0 and math.isfinite(std)):
        raise ValueError(f"`stats` (={stats!r}) must be a finite mean and a finite std > 0.")
    return tuple(((np.asarray(x, np.float32) - mean) / std).astype(np.float32) for x in (train_images, *other_images))


def default_optimizer(learning_rate=0.05, momentum=0.9, weight_decay=5e-4):
    """SGD with momentum and coupled weight decay: ``optax.chain(add_decayed_weights, sgd)``.

    Per step, with gradient ``g`` of the objective:
    ``v <- momentum * v + (g + weight_decay * w)``, ``w <- w - learning_rate * v``.
    The decay is added to the gradient before the momentum (as in PyTorch's
    ``SGD(weight_decay=...)`` and an L2 term ``lambda ||w||^2`` with ``lambda = wd / 2``),
    not decoupled (AdamW style).  ``learning_rate`` may be an optax schedule.
    """
    for name, value in (("learning_rate", learning_rate), ("momentum", momentum), ("weight_decay", weight_decay)):
        if callable(value) and name == "learning_rate":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`{name}` (={value!r}) must be a finite number >= 0.")
    if not callable(learning_rate) and learning_rate <= 0:
        raise ValueError(f"`learning_rate` (={learning_rate!r}) must be > 0.")
    transforms = []
    if weight_decay:
        transforms.append(optax.add_decayed_weights(weight_decay))
    transforms.append(optax.sgd(learning_rate, momentum=momentum or None))
    return optax.chain(*transforms)


#: ``--optimizer`` names, :func:`make_optimizer`.
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
#: ``--schedule`` names, :func:`make_schedule`.
SCHEDULES = ("constant", "cosine", "step")


def _nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` (={value!r}) must be a finite number >= 0.")
    return float(value)


def make_schedule(learning_rate: float, schedule: str = "constant", *, total_steps: int, warmup_steps: int = 0):
    """An optax schedule ``step -> learning rate``: linear warm-up from 0, then ``schedule``.

    * ``"constant"``: ``learning_rate`` after the warm-up.
    * ``"cosine"``: from ``learning_rate`` down to 0 at ``total_steps`` along half a cosine
      (Loshchilov & Hutter 2017, no restarts).
    * ``"step"``: ``learning_rate``, divided by 10 at 50% and again at 75% of ``total_steps``.

    ``warmup_steps`` (``>= 0``, ``< total_steps``) ramps linearly from 0 to
    ``learning_rate`` (Goyal et al. 2017), counted within ``total_steps``.
    """
    learning_rate = _nonnegative(learning_rate, "learning_rate")
    if learning_rate <= 0:
        raise ValueError(f"`learning_rate` (={learning_rate!r}) must be > 0.")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` (={schedule!r}) must be one of {list(SCHEDULES)}.")
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "total_steps" else 0):
            raise ValueError(f"`{name}` (={value!r}) must be an int >= {1 if name == 'total_steps' else 0}.")
    if warmup_steps >= total_steps:
        raise ValueError(f"`warmup_steps` (={warmup_steps}) must be less than `total_steps` (={total_steps}).")
    rest = total_steps - warmup_steps
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, rest)
    else:
        main = optax.piecewise_constant_schedule(
            learning_rate,
            {max(1, total_steps // 2 - warmup_steps): 0.1, max(2, (3 * total_steps) // 4 - warmup_steps): 0.1},
        )
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(name: str = "momentum", learning_rate=0.05, *, momentum: float = 0.9, weight_decay: float = 5e-4):
    """An optax optimizer by name; ``learning_rate`` a number or a schedule (:func:`make_schedule`).

    * ``"sgd"``: plain SGD, ``w <- w - lr (g + wd w)``.
    * ``"momentum"``: SGD with heavy-ball momentum, :func:`default_optimizer`.
    * ``"adam"``: Adam (Kingma & Ba 2015) with the decay added to the gradient (coupled, an L2 term).
    * ``"adamw"``: Adam with decoupled weight decay (Loshchilov & Hutter 2019, ``optax.adamw``):
      ``w <- w - lr (adam(g) + wd w)``.

    ``momentum`` is used by ``"momentum"`` only.  Weight decay applies to every
    trainable array (optimizers see only :func:`jaxconv.nn.partition_state`'s
    trainable part, never the running statistics).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"`name` (={name!r}) must be one of {list(OPTIMIZERS)}.")
    weight_decay = _nonnegative(weight_decay, "weight_decay")
    if name == "momentum":
        return default_optimizer(learning_rate, momentum, weight_decay)
    if not callable(learning_rate) and _nonnegative(learning_rate, "learning_rate") <= 0:
        raise ValueError(f"`learning_rate` (={learning_rate!r}) must be > 0.")
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if name == "sgd":
        return optax.chain(*decay, optax.sgd(learning_rate))
    return optax.chain(*decay, optax.adam(learning_rate))


def build_optimizer(config: dict, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimizer a run's settings describe, ``config`` as :func:`jaxconv.train.fit` records it.

    ``config`` holds ``optimizer``, ``learning_rate``, ``schedule``,
    ``warmup_epochs``, ``momentum``, ``weight_decay`` and ``epochs`` (a
    checkpoint's ``metadata["config"]``, ``Config.settings()``); the schedule
    spans ``epochs * steps_per_epoch`` steps.  ``ValueError`` if the warm-up is
    the whole run.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"`steps_per_epoch` (={steps_per_epoch!r}) must be an int >= 1.")
    total = int(config["epochs"]) * steps_per_epoch
    warmup = round(float(config["warmup_epochs"]) * steps_per_epoch)
    if warmup >= total:
        raise ValueError(f"--warmup-epochs {config['warmup_epochs']} is the whole run ({config['epochs']} epochs).")
    lr = config["learning_rate"]
    if config["schedule"] != "constant" or warmup:
        lr = make_schedule(lr, config["schedule"], total_steps=total, warmup_steps=warmup)
    return make_optimizer(config["optimizer"], lr, momentum=config["momentum"], weight_decay=config["weight_decay"])


def split_validation(images, labels, fraction: float):
    """``(train_images, train_labels, val_images, val_labels)``: ``fraction`` of the examples held out.

    The held-out examples are a fixed random subset (the same for every seed, so
    runs with different seeds select models on the same images), at least one
    example when ``fraction > 0``; ``fraction = 0`` holds out nothing (empty
    validation arrays).  The test set is for the final report, not for choosing
    a model; this split is.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"`fraction` (={fraction!r}) must be a number in [0, 1).")
    n = int(np.shape(images)[0])
    count = 0 if fraction == 0 else max(1, int(round(n * fraction)))
    if count >= n:
        raise ValueError(f"`fraction` (={fraction}) of {n} examples leaves no training examples.")
    order = np.random.default_rng(0x5EED).permutation(n)
    val, keep = np.sort(order[:count]), np.sort(order[count:])
    return images[keep], labels[keep], images[val], labels[val]


def augment_images(key, images, *, pad: int, flip: bool):
    """Random crops with zero padding, and (``flip=True``) random horizontal flips, per image; jittable.

    Each image ``(H, W, C)`` is padded by ``pad`` pixels of zeros on every side
    (zero is the mean after :func:`standardize`) and an ``H x W`` window is cut
    at a random offset; with ``flip`` it is mirrored left-right with probability
    1/2.  The randomness comes from ``key`` only, so a step that derives its key
    from ``(seed, step)`` augments identically when a run is resumed.
    """
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        out = jnp.where(mirror, out[:, :, ::-1, :], out)
    return out


def init_params(init_fun, input_shape, seed: int = 0):
    """``init_fun(jax.random.key(seed), (-1, *input_shape[1:]))``: the output shape and params."""
    return init_fun(jax.random.key(seed), (-1, *tuple(input_shape)[1:]))


def _objective(apply_fun, l2):
    def objective(trainable, state, images, labels):
        logits, new_params = nn.train_apply(apply_fun, nn.merge_state(trainable, state), images)
        cross_entropy = losses.softmax_cross_entropy(logits, labels)
        total = cross_entropy + losses.l2_penalty(trainable, l2) if l2 > 0 else cross_entropy
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        metrics = {"loss": cross_entropy, "objective": total, "accuracy": accuracy}
        return total, (metrics, nn.partition_state(new_params)[1])

    return objective


def init_optimizer(optimizer: optax.GradientTransformation, params):
    """``optimizer.init`` of the trainable part of ``params`` (:func:`jaxconv.nn.partition_state`):
    the optimizer state :func:`make_train_step`'s step takes."""
    return optimizer.init(nn.partition_state(params)[0])


def _check_batch(batch, mesh):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"`batch` must be a pair (images, labels), got {type(batch).__name__}.")
    images, labels = batch
    if jnp.ndim(images) < 1 or jnp.ndim(labels) != 1 or jnp.shape(images)[0] != jnp.shape(labels)[0]:
        raise ValueError(
            f"`batch`: images {jnp.shape(images)} and labels {jnp.shape(labels)} must share the "
            f"leading (batch) dimension, labels 1-D."
        )
    if mesh is not None:
        _check_divisible(jnp.shape(images)[0], mesh)


def _check_divisible(n: int, mesh: Mesh):
    if n % mesh.size:
        raise ValueError(
            f"the batch size (={n}) must be divisible by the number of devices in the mesh (={mesh.size})."
        )


def make_train_step(
    apply_fun: Callable,
    optimizer: optax.GradientTransformation,
    *,
    l2=0.0,
    mesh: Mesh | None = None,
    augment: Callable | None = None,
):
    """A jitted, pure training step ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    Args:
      apply_fun: ``apply_fun(params, images) -> logits (N, C)``.
      optimizer: any optax ``GradientTransformation`` (``opt_state = optimizer.init(params)``).
      l2: ``lambda >= 0`` of the L2 term added to the cross-entropy (docs/losses.md,
        The training objective); 0 leaves it out.
      mesh: a 1-D mesh over ``"batch"`` (:func:`make_mesh`) to run data parallel;
        the batch size must be divisible by its device count.
      augment: ``augment(key, images) -> images`` (e.g. :func:`augment_images`
        with its options bound), applied inside the step; the batch is then
        ``(images, labels, key)`` with a PRNG key (derive it from the seed and
        the step number, ``jax.random.fold_in(key, step)``, and resuming stays exact).

    Layers with state (:func:`jaxconv.nn.BatchNorm`) run in training mode
    (:func:`jaxconv.nn.train_apply`): the gradient and the optimizer see only
    the trainable part of ``params`` (``opt_state = init_optimizer(optimizer,
    params)``, which is ``optimizer.init(params)`` for a network without state);
    the running statistics in the returned ``params`` are updated from the batch.

    ``batch`` is ``(images, labels)``: float32 NHWC images ``(N, H, W, C)`` and
    int32 labels ``(N,)``.  ``metrics`` is ``{"loss": cross-entropy, "objective":
    cross-entropy + L2, "accuracy": fraction correct}`` on the batch, before the
    update, and two divergence flags: ``"finite_loss"`` (the objective is
    finite) and ``"finite_params"`` (every updated parameter is finite), all
    0-d arrays.  The flags cost one fused pass over the parameters inside the
    step and no host transfer: read them when you read the loss (the CLI stops
    a diverged run before it can save non-finite weights).  Nothing is donated: the inputs stay valid.  With a
    mesh, inputs may be host arrays or live anywhere (jit moves them: params and
    optimizer state replicated, the batch split); the outputs are replicated.
    """
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"`l2` (={l2!r}) must be a finite number >= 0.")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"`optimizer` (={optimizer!r}) must be an optax GradientTransformation.")
    if mesh is not None and (not isinstance(mesh, Mesh) or mesh.axis_names != ("batch",)):
        raise ValueError(f"`mesh` (={mesh!r}) must be a 1-D jax.sharding.Mesh over the axis 'batch' (make_mesh()).")
    grad_fn = jax.grad(_objective(apply_fun, float(l2)), has_aux=True)

    def step(params, opt_state, batch):
        images, labels = batch[0], batch[1]
        if augment is not None:
            images = augment(batch[2], images)
        trainable, state = nn.partition_state(params)
        grads, (metrics, state) = grad_fn(trainable, state, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        params = nn.merge_state(optax.apply_updates(trainable, updates), state)
        metrics = dict(metrics, finite_loss=jnp.isfinite(metrics["objective"]), finite_params=all_finite(params))
        return params, opt_state, metrics

    if mesh is None:
        jitted = jax.jit(step)
    else:
        replicated = NamedSharding(mesh, P())
        sharded = NamedSharding(mesh, P("batch"))
        jitted = jax.jit(
            step,
            in_shardings=(replicated, replicated, (sharded, sharded) + ((replicated,) if augment else ())),
            out_shardings=(replicated, replicated, replicated),
        )

    def train_step(params, opt_state, batch):
        if augment is not None:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
                raise ValueError("`batch` must be (images, labels, key) when the step augments (augment=...).")
            _check_batch(tuple(batch[:2]), mesh)
        else:
            _check_batch(batch, mesh)
        return jitted(params, opt_state, tuple(batch))

    train_step.jitted = jitted  # type: ignore[attr-defined]  # a function attribute, which mypy cannot declare
    return train_step


def all_finite(tree):
    """A 0-d bool array: every floating leaf of ``tree`` is free of NaN and infinity."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def nonfinite_leaves(tree) -> list[str]:
    """The key paths (``jax.tree_util.keystr``) of the leaves of ``tree`` that hold a NaN or an infinity."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.all(np.isfinite(np.asarray(leaf)))
    ]


def evaluate(apply_fun: Callable, params, images, labels, *, batch_size: int = 512) -> dict:
    """Mean cross-entropy and accuracy over a whole data set, in batches.

    Returns ``{"loss": float, "accuracy": float}``: the mean over all examples
    (no L2 term).  At most two programs are compiled: one for the full batches,
    one for the remainder.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` (={batch_size!r}) must be a positive int.")
    n = int(np.shape(images)[0])
    if n == 0 or np.shape(labels) != (n,):
        raise ValueError(f"`images` {np.shape(images)} and `labels` {np.shape(labels)}: need N >= 1 and labels (N,).")
    sums = _evaluation_sums(apply_fun)
    total_loss, total_correct = 0.0, 0
    for start in range(0, n, batch_size):
        loss_sum, correct = sums(params, images[start : start + batch_size], labels[start : start + batch_size])
        total_loss += float(loss_sum)
        total_correct += int(correct)
    return {"loss": total_loss / n, "accuracy": total_correct / n}


_EVALUATION_CACHE: dict = {}


def _evaluation_sums(apply_fun):
    """A jitted ``(params, x, y) -> (sum of cross-entropies, number correct)``, one per apply_fun."""
    if apply_fun not in _EVALUATION_CACHE:

        @jax.jit
        def sums(params, images, labels):
            logits = apply_fun(params, images)
            loss = losses.softmax_cross_entropy(logits, labels) * labels.shape[0]
            return loss, jnp.sum(jnp.argmax(logits, axis=-1) == labels)

        if len(_EVALUATION_CACHE) > 32:
            _EVALUATION_CACHE.clear()
        _EVALUATION_CACHE[apply_fun] = sums
    return _EVALUATION_CACHE[apply_fun]


# --- data parallel ------------------------------------------------------------------


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` of ``jax.devices()`` (default: all), axis ``"batch"``."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"`num_devices` (={num_devices!r}) must be an int in [1, {len(devices)}] "
            f"(the devices JAX sees: {len(devices)} x {devices[0].platform}; on CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)."
        )
    return Mesh(np.asarray(devices[:num_devices]), ("batch",))


def _put(leaf, sharding: NamedSharding):
    """``leaf`` placed with ``sharding``: a host array is read only where this process's devices need it."""
    if isinstance(leaf, jax.Array):
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(batch, mesh: Mesh):
    """Put every array of ``batch`` on ``mesh`` split along its leading axis (``P("batch")``).

    Several processes (``jax.distributed``): every process passes the same
    global batch; each copies only the rows its own devices hold, and the
    result is one global array.
    """
    leaves = jax.tree.leaves(batch)
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(f"shard_batch: every array needs a leading batch axis, got shape {jnp.shape(leaf)}.")
        _check_divisible(jnp.shape(leaf)[0], mesh)
    sharding = NamedSharding(mesh, P("batch"))
    return jax.tree.map(lambda leaf: _put(leaf, sharding), batch)


def replicate(tree, mesh: Mesh):
    """A copy of every array of ``tree`` on each device of ``mesh`` (``P()``).

    Several processes: every process passes the same values (e.g. the same
    restored checkpoint); the result is one global, replicated array per leaf.
    """
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda leaf: _put(leaf, sharding), tree)
