"""Test a claim: train a convnet by gradient descent on its matrix M, then get K back.

The claim: compute the conv layer as a matrix product ``M vec(x)``, differentiate
it as a dense layer, take a gradient step on ``M``, recover a kernel ``K`` from the
updated ``M``, repeat; and that "gradient descent on M keeps all the properties of
M enough for it to still be equivalent to some K".

One small net, conv 3x3 (1 -> 6 channels) + bias, ReLU, dense to 10 classes,
mean softmax cross-entropy, on scikit-learn's bundled 8x8 digits, full-batch
gradient descent in float64 (deterministic, so trajectories can be compared
step by step).  Routes, all from the same initialisation:

* ``a``: gradient descent on K (``jax.grad`` through ``jaxconv.conv2d``) at rate eta.
* ``b``: the matrix loop: ``M = filter_matrix(K)``; ``dL/dM = dL/dvec(S)^T vec(X)``,
  the dense-layer formula (docs/layers.md, Fully connected layer); ``M <- M - eta dL/dM``;
  ``K = kernel_from_matrix(M)`` (least squares); repeat.  The other layers step at eta.
* ``a_rescaled``: route a with K's rate eta / (Ho*Wo), one number.
* ``a_per_weight``: route a with weight e's rate eta / |P_e|, |P_e| the number of
  entries of M that weight e occupies (``= Ho*Wo`` for every weight without padding).
* ``c``: gradient descent on M with no projection at all: the plain MLP the
  seed says stays a convolution.  Measured: how far its M leaves the conv
  structure, its accuracy, and the accuracy after projecting its M to the
  nearest K once at the end.

Measured, not assumed: per step, the part of the updated M off the conv-matrix
structure (route b, before the projection; route c, cumulatively); the distance
between route b's kernels and each route a variant's kernels; test accuracies
over a few seeds.  Both paddings: VALID (every |P_e| equal) and SAME (|P_e|
differs between centre, edge and corner weights).

Run: ``python experiments/commutative_diagram.py`` (about a minute on 2 CPU cores);
writes ``experiments/results/commutative_diagram.json`` and ``.png``.
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import jaxconv
from jaxconv import matrix

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CHANNELS = 6
KERNEL = (3, 3)
STEPS = 300
ETA = 0.5
SEEDS = (0, 1, 2)
PADDINGS = ("VALID", "SAME")
ROUTES = ("a", "b", "a_rescaled", "a_per_weight", "c")


def load_data(seed=0, test_fraction=0.3):
    digits = load_digits()
    x = (digits.images / 16.0)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return (jnp.asarray(x[train]), jnp.asarray(y[train])), (jnp.asarray(x[test]), jnp.asarray(y[test]))


def init(key, padding, in_hw=(8, 8)):
    k1, k2 = jax.random.split(key)
    ho, wo = jax.eval_shape(
        lambda: jaxconv.conv2d(jnp.zeros((1, *in_hw, 1)), jnp.zeros((*KERNEL, 1, CHANNELS)), padding=padding)
    ).shape[1:3]
    features = ho * wo * CHANNELS
    return {
        "k": jax.random.normal(k1, (*KERNEL, 1, CHANNELS)) / 3.0,
        "b": jnp.zeros(CHANNELS),
        "w": jax.random.normal(k2, (features, 10)) / np.sqrt(features),
        "c": jnp.zeros(10),
    }, (ho, wo)


def head(params, s):
    """ReLU, flatten (row-major NHWC), dense, mean softmax cross-entropy: every route's tail."""
    h = jax.nn.relu(s).reshape(s.shape[0], -1)
    return h @ params["w"] + params["c"]


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def conv_logits(params, x, padding):
    return head(params, jaxconv.conv2d(x, params["k"], params["b"], padding=padding))


def matrix_logits(params, m, x, out_hw):
    """The MLP view: vec(S) = M vec(X) per image, planes stacked, back to NHWC."""
    n = x.shape[0]
    s = (matrix.vec(x) @ m.T).reshape(n, CHANNELS, *out_hw).transpose(0, 2, 3, 1) + params["b"]
    return head(params, s)


def accuracy(logits, labels):
    return float(np.mean(np.asarray(jnp.argmax(logits, axis=1)) == np.asarray(labels)))


def off_structure(m, padding):
    """||m - M(K_ls)||_F / ||m||_F: the relative part of m that no kernel explains."""
    _, residual = matrix.kernel_from_matrix(m, (8, 8), (*KERNEL, 1, CHANNELS), padding=padding)
    return residual / jnp.linalg.norm(m)


def make_steps(padding, out_hw, counts):
    kshape = (*KERNEL, 1, CHANNELS)

    def conv_loss(params, x, y):
        return cross_entropy(conv_logits(params, x, padding), y)

    def gd_on_k(k_rate):
        @jax.jit
        def step(params, x, y):
            loss, grads = jax.value_and_grad(conv_loss)(params, x, y)
            new = {name: p - ETA * grads[name] for name, p in params.items()}
            new["k"] = params["k"] - k_rate * grads["k"]
            return new, loss

        return step

    @jax.jit
    def seed_step(params, x, y):
        """Route b: K -> M, dense-layer gradient on M, step, M -> K by least squares."""
        m = matrix.filter_matrix(params["k"], (8, 8), padding=padding)

        def loss_of_s(vec_s, rest):
            s = vec_s.reshape(x.shape[0], CHANNELS, *out_hw).transpose(0, 2, 3, 1) + rest["b"]
            return cross_entropy(head(rest, s), y)

        rest = {n: p for n, p in params.items() if n != "k"}
        vec_x = matrix.vec(x)
        vec_s = vec_x @ m.T
        loss, (d_vec_s, d_rest) = jax.value_and_grad(loss_of_s, argnums=(0, 1))(vec_s, rest)
        d_m = d_vec_s.T @ vec_x  # docs/layers.md (FC layer): dz/dW = dz/dvec(Y) vec(X)^T, summed over the batch
        m_new = m - ETA * d_m
        k_new, residual = matrix.kernel_from_matrix(m_new, (8, 8), kshape, padding=padding)
        new = {n: p - ETA * d_rest[n] for n, p in rest.items()}
        new["k"] = k_new
        stats = {
            "off_structure_of_updated_m": residual / jnp.linalg.norm(m_new),
            "off_structure_of_step": residual / jnp.linalg.norm(ETA * d_m),
        }
        return new, loss, stats

    @jax.jit
    def mlp_step(params, m, x, y):
        """Route c: gradient descent on M as a dense layer, never projected."""

        def loss(params, m):
            return cross_entropy(matrix_logits(params, m, x, out_hw), y)

        value, (grads, d_m) = jax.value_and_grad(loss, argnums=(0, 1))(params, m)
        return {n: p - ETA * grads[n] for n, p in params.items()}, m - ETA * d_m, value

    per_weight_rate = ETA / jnp.asarray(np.maximum(counts, 1).reshape(kshape), jnp.float64)
    return {
        "a": gd_on_k(ETA),
        "a_rescaled": gd_on_k(ETA / (out_hw[0] * out_hw[1])),
        "a_per_weight": gd_on_k(per_weight_rate),
        "b": seed_step,
        "c": mlp_step,
    }


def run(padding, seed, data):
    (x_train, y_train), (x_test, y_test) = data
    params0, out_hw = init(jax.random.PRNGKey(seed), padding)
    kshape = params0["k"].shape
    # |P_e|, the entries of M weight e occupies: M is linear in K with each weight
    # copied |P_e| times, so the gradient of sum(M) is exactly that count.
    counts = np.asarray(jax.grad(lambda k: matrix.filter_matrix(k, (8, 8), padding=padding).sum())(params0["k"]))
    counts = counts.astype(np.int64).reshape(-1)
    steps = make_steps(padding, out_hw, counts)

    history = {r: {"loss": [], "k": []} for r in ROUTES}
    history["b"].update(off_structure_of_updated_m=[], off_structure_of_step=[])
    history["c"].update(off_structure_of_m=[])
    state = {r: dict(params0) for r in ROUTES}
    m_c = matrix.filter_matrix(params0["k"], (8, 8), padding=padding)
    for _ in range(STEPS):
        for r in ("a", "a_rescaled", "a_per_weight"):
            state[r], loss = steps[r](state[r], x_train, y_train)
            history[r]["loss"].append(float(loss))
            history[r]["k"].append(np.asarray(state[r]["k"]))
        state["b"], loss, stats = steps["b"](state["b"], x_train, y_train)
        history["b"]["loss"].append(float(loss))
        history["b"]["k"].append(np.asarray(state["b"]["k"]))
        for name, value in stats.items():
            history["b"][name].append(float(value))
        state["c"], m_c, loss = steps["c"](state["c"], m_c, x_train, y_train)
        history["c"]["loss"].append(float(loss))
        history["c"]["off_structure_of_m"].append(float(off_structure(m_c, padding)))

    k_b = np.stack(history["b"]["k"])
    scale = np.abs(k_b).max()
    result = {
        "out_hw": list(out_hw),
        "entries_per_weight": {
            "min": int(counts.min()),
            "max": int(counts.max()),
            "distinct": sorted({int(v) for v in counts}),
        },
        "final_train_loss": {r: history[r]["loss"][-1] for r in ROUTES},
        "test_accuracy": {r: accuracy(conv_logits(state[r], x_test, padding), y_test) for r in ROUTES if r != "c"},
        "route_b_kernel_distance_to": {
            r: float(np.abs(np.stack(history[r]["k"]) - k_b).max() / scale) for r in ("a", "a_rescaled", "a_per_weight")
        },
        "route_b_off_structure_of_updated_m": {
            "max": max(history["b"]["off_structure_of_updated_m"]),
            "median": float(np.median(history["b"]["off_structure_of_updated_m"])),
        },
        "route_b_off_structure_of_step": {
            "min": min(history["b"]["off_structure_of_step"]),
            "median": float(np.median(history["b"]["off_structure_of_step"])),
        },
        "route_c_off_structure_of_m_final": history["c"]["off_structure_of_m"][-1],
    }
    k_from_c, _ = matrix.kernel_from_matrix(m_c, (8, 8), kshape, padding=padding)
    result["test_accuracy"]["c"] = accuracy(matrix_logits(state["c"], m_c, x_test, out_hw), y_test)
    result["test_accuracy"]["c_projected_to_nearest_k"] = accuracy(
        conv_logits({**state["c"], "k": k_from_c}, x_test, padding), y_test
    )
    return result, history


def plot(histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PADDINGS), 3, figsize=(15, 4.2 * len(PADDINGS)))
    labels = {
        "a": "a: GD on K, rate eta",
        "b": "b: matrix loop (M step, K by least squares)",
        "a_rescaled": "a, K rate eta/(Ho*Wo)",
        "a_per_weight": "a, K rate eta/|P_e|",
        "c": "c: GD on M, never projected (MLP)",
    }
    for row, padding in enumerate(PADDINGS):
        h = histories[padding]
        ax = axes[row, 0]
        for r in ROUTES:
            ax.plot(h[r]["loss"], label=labels[r], linestyle="--" if r in ("a_rescaled", "a_per_weight") else "-")
        ax.set(title=f"{padding}: training loss (seed 0)", xlabel="step", ylabel="cross-entropy", yscale="log")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        k_b = np.stack(h["b"]["k"])
        for r in ("a", "a_rescaled", "a_per_weight"):
            d = np.abs(np.stack(h[r]["k"]) - k_b).reshape(len(k_b), -1).max(axis=1) / np.abs(k_b).max()
            # Without padding the two rescaled routes coincide: draw one dotted and wide.
            style = dict(linestyle=":", linewidth=3) if r == "a_rescaled" else {}
            ax.plot(np.maximum(d, 1e-17), label=labels[r], **style)
        ax.set(title=f"{padding}: max |K_route - K_b| / max |K_b|", xlabel="step", yscale="log")
        ax.legend(fontsize=7)
        ax = axes[row, 2]
        ax.plot(h["b"]["off_structure_of_step"], label="b: off-structure part of eta dL/dM (relative)")
        ax.plot(h["b"]["off_structure_of_updated_m"], label="b: off-structure part of updated M (relative)")
        ax.plot(h["c"]["off_structure_of_m"], label="c: off-structure part of M (relative)")
        ax.set(title=f"{padding}: how far M leaves the conv structure", xlabel="step", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    data = load_data()
    results, histories = {}, {}
    for padding in PADDINGS:
        per_seed = []
        for seed in SEEDS:
            result, history = run(padding, seed, data)
            per_seed.append(result)
            if seed == SEEDS[0]:
                histories[padding] = history
        accuracies = {r: [s["test_accuracy"][r] for s in per_seed] for r in per_seed[0]["test_accuracy"]}
        results[padding] = {
            "per_seed": per_seed,
            "test_accuracy_mean": {r: float(np.mean(v)) for r, v in accuracies.items()},
            "test_accuracy_min_max": {r: [min(v), max(v)] for r, v in accuracies.items()},
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(histories, RESULTS / "commutative_diagram.png")
    record = {
        "experiment": "commutative_diagram (GD on M, K by least squares)",
        "jax_version": jax.__version__,
        "jaxconv_version": jaxconv.__version__,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "dtype": "float64",
        "data": "sklearn.datasets.load_digits (1797 8x8 images), 70/30 split, seed 0",
        "model": f"conv {KERNEL[0]}x{KERNEL[1]} 1->{CHANNELS} + bias, ReLU, dense -> 10, mean softmax cross-entropy",
        "optimiser": f"full-batch gradient descent, eta={ETA}, {STEPS} steps, seeds {list(SEEDS)}",
        "routes": {
            "a": "GD on K at rate eta (jax.grad through jaxconv.conv2d)",
            "b": "matrix loop: M=filter_matrix(K); dL/dM = dL/dvec(S)^T vec(X); M -= eta dL/dM; "
            "K = kernel_from_matrix(M)",
            "a_rescaled": "GD on K at rate eta/(Ho*Wo)",
            "a_per_weight": "GD on K at rate eta/|P_e| per weight (|P_e| = entries of M that weight e occupies)",
            "c": "GD on M as a dense layer, never projected",
            "c_projected_to_nearest_k": "route c's final M replaced by filter_matrix(kernel_from_matrix(M)), "
            "other layers kept",
        },
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (RESULTS / "commutative_diagram.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        json.dumps(
            {
                p: {
                    "accuracy": results[p]["test_accuracy_mean"],
                    "route_b_vs": results[p]["per_seed"][0]["route_b_kernel_distance_to"],
                    "off_structure_step": results[p]["per_seed"][0]["route_b_off_structure_of_step"],
                }
                for p in PADDINGS
            },
            indent=1,
        )
    )
    print(f"{record['seconds']} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
