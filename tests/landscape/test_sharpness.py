"""Sharpness measures against closed forms on quadratics, numpy references and the
ReLU rescaling of Dinh et al. 2017."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m

S = ls.sharpness
KEY = jax.random.key(0)
DUMMY = jnp.zeros((6, 1))  # the quadratics below ignore their batch


def quadratic(spectrum, seed=0, loss0=0.3, cubic=0.0):
    """L(w) = ½ (w−w*)ᵀA(w−w*) + cubic·(aᵀ(w−w*))³ + loss0 over a two-leaf pytree."""
    rng = np.random.default_rng(seed)
    n = len(spectrum)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a_mat = q @ np.diag(spectrum) @ q.T
    wstar = {"u": jnp.asarray(rng.normal(size=n // 2)),
             "v": jnp.asarray(rng.normal(size=(n - n // 2,)))}
    direction = jnp.asarray(rng.normal(size=n))
    flat_star = ravel_pytree(wstar)[0]
    A = jnp.asarray(a_mat)

    def loss(p, batch):
        z = ravel_pytree(p)[0] - flat_star
        return 0.5 * z @ A @ z + cubic * (direction @ z) ** 3 + loss0 + 0.0 * batch.sum()

    return loss, wstar, a_mat


def trust_region_max(g, a, rho):
    """max over ‖ε‖ ≤ ρ of gᵀε + ½ εᵀAε for PSD A, by the secular equation in numpy."""
    lam, q = np.linalg.eigh(a)
    gq = q.T @ g

    def norm(mu):
        return np.linalg.norm(gq / (mu - lam))

    lo = lam[-1] + 1e-12
    hi = lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    eps = q @ (gq / (hi - lam))
    return g @ eps + 0.5 * eps @ a @ eps


SPECTRUM = [5.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05]


# ------------------------------------------------------------------ worst case ---

@pytest.mark.parametrize("rho", [0.5, 0.05])
def test_worst_case_at_a_quadratic_minimum_is_rho_squared_lambda_max_over_two(rho):
    loss, wstar, a = quadratic(SPECTRUM)
    out = S.worst_case(loss, wstar, DUMMY, key=KEY, rho=rho, num_steps=60)
    np.testing.assert_allclose(out.value, rho**2 * 5.0 / 2, rtol=1e-8)
    np.testing.assert_allclose(out.loss, 0.3, rtol=1e-12)
    eps = np.asarray(ravel_pytree(out.perturbation)[0])
    np.testing.assert_allclose(np.linalg.norm(eps), rho, rtol=1e-10)
    top = np.linalg.eigh(a)[1][:, -1]
    np.testing.assert_allclose(abs(top @ eps) / rho, 1.0, atol=1e-6)


def test_worst_case_tends_to_rho_squared_lambda_max_over_two_as_rho_shrinks():
    loss, wstar, _ = quadratic(SPECTRUM, cubic=2.0)
    errors = []
    for rho in (1e-1, 1e-2, 1e-3):
        out = S.worst_case(loss, wstar, DUMMY, key=KEY, rho=rho, num_steps=60)
        errors.append(abs(out.value / (rho**2 * 5.0 / 2) - 1))
    assert errors[0] > 1e-2  # the cubic term matters at ρ = 0.1 ...
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5  # ... and fades as ρ
    assert errors[2] < 1e-2


def per_example_quadratic(n=12, d=4, seed=3):
    """ℓ_i(w) = ½ (w − a_i)ᵀ A (w − a_i): a chunk's loss is a quadratic in closed form."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a_mat = q @ np.diag([3.0, 1.0, 0.5, 0.2]) @ q.T
    targets = rng.normal(size=(n, d))
    A = jnp.asarray(a_mat)

    def loss(w, batch):
        z = w["w"] - batch
        return 0.5 * jnp.mean(jnp.einsum("ni,ij,nj->n", z, A, z))

    return loss, {"w": jnp.zeros(d)}, jnp.asarray(targets), a_mat, targets


def test_worst_case_away_from_a_minimum_matches_the_trust_region_solution():
    loss, params, batch, a, targets = per_example_quadratic()
    g = a @ (0.0 - targets.mean(0))
    rho = 0.2
    ref = trust_region_max(g, a, rho)
    out = S.worst_case(loss, params, batch, key=KEY, rho=rho, num_steps=80, chunk_size=5)
    np.testing.assert_allclose(out.value, ref, rtol=1e-7)


def test_m_sharpness_averages_each_chunks_own_maximum():
    loss, params, batch, a, targets = per_example_quadratic()
    rho, m_ = 0.2, 4
    ref = np.mean([trust_region_max(a @ (0.0 - targets[i:i + m_].mean(0)), a, rho)
                   for i in range(0, 12, m_)])
    out = S.worst_case(loss, params, batch, key=KEY, rho=rho, num_steps=80, m=m_)
    np.testing.assert_allclose(out.value, ref, rtol=1e-7)
    assert out.perturbation is None
    whole = S.worst_case(loss, params, batch, key=KEY, rho=rho, num_steps=80)
    assert out.value > whole.value  # each chunk gets its own worst direction


def test_worst_case_is_the_same_under_jit_and_vmap():
    params = m.mlp_params(jax.random.key(1))
    batch = m.classification_data(jax.random.key(2), n=30)
    plain = S.worst_case(m.ce_loss, params, batch, key=KEY, rho=0.1, num_steps=5)
    jitted = jax.jit(lambda p, r: S.worst_case(m.ce_loss, p, batch, key=KEY, rho=r,
                                               num_steps=5).value)
    np.testing.assert_allclose(jitted(params, 0.1), plain.value, rtol=1e-10)
    rhos = jnp.array([0.05, 0.1])
    mapped = jax.vmap(lambda r: S.worst_case(m.ce_loss, params, batch, key=KEY, rho=r,
                                             num_steps=5).value)(rhos)
    np.testing.assert_allclose(mapped[1], plain.value, rtol=1e-10)
    # The value is a real increase: recompute L(w + ε) − L(w) directly.
    direct = m.ce_loss(jax.tree.map(jnp.add, params, plain.perturbation), batch) - \
        m.ce_loss(params, batch)
    np.testing.assert_allclose(plain.value, direct, rtol=1e-10)


# -------------------------------------------------------------------- adaptive ---

def test_adaptive_at_a_quadratic_minimum_matches_the_scaled_eigenvalue():
    loss, wstar, a = quadratic(SPECTRUM)
    eta, rho = 0.1, 0.3
    c = np.abs(np.asarray(ravel_pytree(wstar)[0])) + eta
    ref = rho**2 * np.linalg.eigvalsh(c[:, None] * a * c[None, :])[-1] / 2
    out = S.adaptive(loss, wstar, DUMMY, key=KEY, rho=rho, eta=eta, num_steps=80)
    np.testing.assert_allclose(out.value, ref, rtol=1e-7)
    eps = np.asarray(ravel_pytree(out.perturbation)[0])
    np.testing.assert_allclose(np.linalg.norm(eps / c), rho, rtol=1e-10)


def relu_mlp(params, x):
    h = jax.nn.relu(x @ params["layer0"]["w"] + params["layer0"]["b"])
    h = jax.nn.relu(h @ params["layer1"]["w"] + params["layer1"]["b"])
    return h @ params["layer2"]["w"] + params["layer2"]["b"]


def relu_loss(params, batch):
    return ls.cross_entropy(relu_mlp(params, batch[0]), batch[1])


@pytest.mark.slow
def test_adaptive_sharpness_is_invariant_to_relu_rescaling_while_lambda_max_moves():
    params = m.mlp_params(jax.random.key(4), sizes=(5, 8, 8, 3))
    batch = m.classification_data(jax.random.key(5), n=40)
    scaled = ls.rescale_relu(params, 10.0, incoming="layer0", outgoing="layer1/w")
    np.testing.assert_allclose(relu_loss(scaled, batch), relu_loss(params, batch),
                               rtol=1e-12)
    lam = S.lambda_max(relu_loss, params, batch, key=KEY)
    lam_scaled = S.lambda_max(relu_loss, scaled, batch, key=KEY)
    assert lam_scaled / lam > 5.0  # the function is the same, the curvature is not

    kw = dict(key=KEY, rho=0.5, eta=0.0, num_steps=10)
    a = S.adaptive(relu_loss, params, batch, **kw)
    b = S.adaptive(relu_loss, scaled, batch, **kw)
    assert a.value > 1e-3
    np.testing.assert_allclose(b.value, a.value, rtol=1e-5)


@pytest.mark.slow
def test_other_measures_under_relu_rescaling():
    params = m.mlp_params(jax.random.key(4), sizes=(5, 8, 8, 3))
    batch = m.classification_data(jax.random.key(5), n=40)
    scaled = ls.rescale_relu(params, 10.0, incoming="layer0", outgoing="layer1/w")
    # Plain ρ-sharpness is not invariant.
    wa = S.worst_case(relu_loss, params, batch, key=KEY, rho=0.5, num_steps=10)
    wb = S.worst_case(relu_loss, scaled, batch, key=KEY, rho=0.5, num_steps=10)
    assert abs(wb.value / wa.value - 1) > 0.1
    # Average-case adaptive sharpness and the Fisher-Rao norm are invariant.
    ra = S.random(relu_loss, params, batch, key=KEY, rho=0.3, scale="elementwise")
    rb = S.random(relu_loss, scaled, batch, key=KEY, rho=0.3, scale="elementwise")
    np.testing.assert_allclose(rb.mean, ra.mean, rtol=1e-5)
    np.testing.assert_allclose(S.fisher_rao_norm(relu_loss, scaled, batch),
                               S.fisher_rao_norm(relu_loss, params, batch), rtol=1e-5)


# ---------------------------------------------------------------------- random ---

@pytest.mark.parametrize("scale", ["none", "tensor", "elementwise"])
def test_random_sharpness_mean_matches_half_the_scaled_trace(scale):
    loss, wstar, a = quadratic(SPECTRUM)
    rho, eta = 0.2, 0.05
    w = np.asarray(ravel_pytree(wstar)[0])
    if scale == "none":
        c = np.ones_like(w)
    elif scale == "elementwise":
        c = np.abs(w) + eta
    else:
        u, v = np.asarray(wstar["u"]), np.asarray(wstar["v"])
        c = np.concatenate([np.full(u.size, np.linalg.norm(u) / np.sqrt(u.size)),
                            np.full(v.size, np.linalg.norm(v) / np.sqrt(v.size))])
    ref = 0.5 * rho**2 * np.sum(c**2 * np.diag(a))  # E[½ εᵀAε], ε = ρ c ⊙ z
    out = S.random(loss, wstar, DUMMY, key=KEY, rho=rho, num_trials=3000, scale=scale,
                   eta=eta, trials_per_chunk=500)
    assert abs(out.mean - ref) < 4 * out.std_error
    assert out.std_error < 0.05 * ref
    if scale == "none":
        np.testing.assert_allclose(ref, rho**2 * sum(SPECTRUM) / 2, rtol=1e-12)
    # The reported perturbation reaches the reported max.
    eps = np.asarray(ravel_pytree(out.perturbation)[0])
    np.testing.assert_allclose(0.5 * eps @ a @ eps, out.max, rtol=1e-10)
    np.testing.assert_allclose(out.max, np.max(out.increases))


@pytest.mark.slow
def test_random_sharpness_chunks_of_trials_and_examples_agree():
    params = m.mlp_params(jax.random.key(1))
    batch = m.classification_data(jax.random.key(2), n=30)
    a = S.random(m.ce_loss, params, batch, key=KEY, num_trials=6, trials_per_chunk=6)
    b = S.random(m.ce_loss, params, batch, key=KEY, num_trials=6, trials_per_chunk=4,
                 chunk_size=8)
    np.testing.assert_allclose(b.increases, a.increases, rtol=1e-10)


# ---------------------------------------------------------------------- keskar ---

def test_keskar_on_a_diagonal_quadratic_reaches_the_box_corner():
    d = np.array([3.0, 1.0, 0.5, 2.0, 0.2])
    wstar = {"w": jnp.asarray([0.5, -2.0, 0.0, 1.0, 3.0])}

    def loss(p, batch):
        z = p["w"] - wstar["w"]
        return 0.5 * jnp.sum(d * z**2) + 0.4 + 0.0 * batch.sum()

    eps = 1e-2
    half = eps * (np.abs(np.asarray(wstar["w"])) + 1)
    ref = 100 * 0.5 * np.sum(d * half**2) / (1 + 0.4)
    out = S.keskar(loss, wstar, DUMMY, key=KEY, epsilon=eps)
    np.testing.assert_allclose(out.value, ref, rtol=1e-10)
    np.testing.assert_allclose(np.abs(out.perturbation["w"]), half, rtol=1e-12)


# ------------------------------------------------------------------- PAC-Bayes ---

def test_pac_bayes_sigma_matches_the_closed_form():
    loss, wstar, a = quadratic(SPECTRUM)
    t = 0.05
    out = S.pac_bayes(loss, wstar, DUMMY, key=KEY, threshold=t, num_samples=1000,
                      num_bisection=20, trials_per_chunk=500)
    # E[½ σ² zᵀAz] = σ² tr(A)/2 = t.
    np.testing.assert_allclose(out.sigma, np.sqrt(2 * t / np.trace(a)), rtol=0.05)
    np.testing.assert_allclose(out.increase, t, rtol=1e-4)  # 20 halvings of log σ
    np.testing.assert_allclose(out.flatness, 1 / out.sigma**2)

    floor = 0.01
    w = np.asarray(ravel_pytree(wstar)[0])
    mag = S.pac_bayes(loss, wstar, DUMMY, key=KEY, threshold=t, num_samples=1000,
                      num_bisection=20, magnitude_aware=True, floor=floor,
                      trials_per_chunk=500)
    # E = ½ Σ A_ii (σ² w_i² + floor²) = t.
    ref = np.sqrt((2 * t - floor**2 * np.trace(a)) / np.sum(np.diag(a) * w**2))
    np.testing.assert_allclose(mag.sigma, ref, rtol=0.05)


# ------------------------------------------------------------------- curvature ---

def test_curvature_measures_match_the_dense_hessian():
    params = m.mlp_params(jax.random.key(1), sizes=(3, 4, 2))  # 26 parameters
    batch = m.classification_data(jax.random.key(2), n=30, d=3, classes=2)
    h = np.asarray(jax.jit(m.dense_hessian, static_argnums=0)(m.ce_loss, params, batch))
    ev = np.linalg.eigvalsh(h)
    np.testing.assert_allclose(S.lambda_max(m.ce_loss, params, batch, key=KEY), ev[-1],
                               rtol=1e-2)  # the adaptive default tol guarantees 1e-2·|λ|
    n = h.shape[0]
    # Hutch++ with 3n probes sketches the whole space: exact.
    tr = S.hessian_trace(m.ce_loss, params, batch, key=KEY, num_probes=3 * n)
    np.testing.assert_allclose(tr.value, np.trace(h), rtol=1e-8)
    fro = S.frobenius(m.ce_loss, params, batch, key=KEY, num_probes=3 * n)
    np.testing.assert_allclose(fro.value, np.linalg.norm(h, "fro"), rtol=1e-8)


def test_fisher_rao_norm_matches_the_homogeneity_identity():
    # Bias-free ReLU net of depth 3: ⟨w, ∇_w ℓ⟩ = 3 ⟨∂ℓ/∂f, f⟩ (Liang et al. 2019).
    key = jax.random.key(6)
    ks = jax.random.split(key, 3)
    params = {"w0": jax.random.normal(ks[0], (5, 7)), "w1": jax.random.normal(ks[1], (7, 6)),
              "w2": jax.random.normal(ks[2], (6, 3))}
    x, y = m.classification_data(jax.random.key(7), n=25)

    def apply(p, x):
        return jax.nn.relu(jax.nn.relu(x @ p["w0"]) @ p["w1"]) @ p["w2"]

    def loss(p, batch):
        return ls.cross_entropy(apply(p, batch[0]), batch[1])

    f = np.asarray(apply(params, x))
    prob = np.exp(f - f.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    dl_df = prob - np.eye(3)[np.asarray(y)]
    ref = np.sqrt(np.mean((3 * np.sum(dl_df * f, axis=1)) ** 2))
    np.testing.assert_allclose(S.fisher_rao_norm(loss, params, (x, y), chunk_size=4), ref,
                               rtol=1e-10)


# ------------------------------------------------------------------- bad input ---

@pytest.mark.parametrize("fn", [S.random, S.worst_case, S.adaptive])
@pytest.mark.parametrize("rho", [0.0, -0.1])
def test_nonpositive_rho_is_rejected(fn, rho):
    loss, wstar, _ = quadratic(SPECTRUM)
    with pytest.raises(ValueError, match="rho"):
        fn(loss, wstar, DUMMY, key=KEY, rho=rho)


def test_pac_bayes_rejects_unreachable_thresholds():
    loss, wstar, _ = quadratic(SPECTRUM)
    with pytest.raises(ValueError, match="unreachable"):
        S.pac_bayes(loss, wstar, DUMMY, key=KEY, threshold=1e-3, sigma_min=1.0)
    with pytest.raises(ValueError, match="sigma_max"):
        S.pac_bayes(loss, wstar, DUMMY, key=KEY, threshold=1e3, sigma_max=1.0)
    with pytest.raises(ValueError, match="threshold"):
        S.pac_bayes(loss, wstar, DUMMY, key=KEY, threshold=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        S.pac_bayes(loss, wstar, DUMMY, key=KEY, sigma_min=2.0, sigma_max=1.0)


def test_other_bad_inputs():
    loss, wstar, _ = quadratic(SPECTRUM)
    with pytest.raises(ValueError, match="scale"):
        S.random(loss, wstar, DUMMY, key=KEY, scale="layer")
    with pytest.raises(ValueError, match="num_trials"):
        S.random(loss, wstar, DUMMY, key=KEY, num_trials=0)
    with pytest.raises(ValueError, match="scalar"):
        S.worst_case(lambda p, b: p["u"], wstar, DUMMY, key=KEY)
    with pytest.raises(ValueError, match="epsilon"):
        S.keskar(loss, wstar, DUMMY, key=KEY, epsilon=0.0)
    with pytest.raises(ValueError, match="eta"):
        S.adaptive(loss, wstar, DUMMY, key=KEY, eta=-1.0)
    with pytest.raises(ValueError, match="m"):
        S.worst_case(loss, wstar, DUMMY, key=KEY, m=0)
    with pytest.raises(ValueError, match="batch"):
        S.worst_case(loss, wstar, jnp.zeros((0, 1)), key=KEY)


def test_rescale_relu_bad_inputs():
    params = m.mlp_params(jax.random.key(4), sizes=(5, 8, 8, 3))
    with pytest.raises(ValueError, match="alpha"):
        ls.rescale_relu(params, 0.0, incoming="layer0", outgoing="layer1/w")
    with pytest.raises(ValueError, match="layer9"):
        ls.rescale_relu(params, 2.0, incoming="layer9", outgoing="layer1/w")
    with pytest.raises(ValueError, match="both"):
        ls.rescale_relu(params, 2.0, incoming="layer0", outgoing="layer0/w")
    out = ls.rescale_relu(params, 2.0, incoming=["layer0/w", "layer0/b"],
                          outgoing="layer1/w")
    np.testing.assert_array_equal(out["layer0"]["b"], 2.0 * params["layer0"]["b"])
    np.testing.assert_array_equal(out["layer1"]["w"], params["layer1"]["w"] / 2.0)
    np.testing.assert_array_equal(out["layer1"]["b"], params["layer1"]["b"])


@pytest.mark.parametrize("fn", [S.worst_case, S.adaptive])
def test_worst_case_at_a_strict_maximum_is_zero_with_zero_perturbation(fn):
    # At a strict maximum every ε ≠ 0 lowers the loss, so the maximum over the ball is
    # attained at ε = 0: value exactly 0, not the (negative) best point of the sphere.
    loss, wstar, _ = quadratic([-x for x in SPECTRUM])
    out = fn(loss, wstar, DUMMY, key=KEY, rho=0.05, num_steps=10)
    assert float(out.value) == 0.0
    assert float(out.perturbed_loss) == float(out.loss) == pytest.approx(0.3)
    np.testing.assert_array_equal(ravel_pytree(out.perturbation)[0], 0.0)
    # m-sharpness: every chunk's maximum is clamped the same way.
    out = fn(loss, wstar, DUMMY, key=KEY, rho=0.05, num_steps=10, m=3)
    assert float(out.value) == 0.0
