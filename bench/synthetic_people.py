"""Synthetic face embeddings with person labels, for the people benchmarks and tests.

    from bench.synthetic_people import generate
    emb, person, image_keys = generate(100_000, seed=0)   # (n,128) float32 unit, int64, int64

Model
-----
Face embeddings of dlib's network live in a narrow cone: two *different* people score a cosine of
0.81 on average. Each face is ``normalize(g + P_person + t_face * e_face)``:

- ``g``: one common direction (the cone's axis), norm 1;
- ``P_person ~ s_person * N(0, diag(lam))``: the person's offset, orthogonal to g, with a
  power-law spectrum ``lam_j ~ j**-BETA`` (j = 1..127, sum ``A``: few directions carry most of the
  variance, as in real embeddings, which is what gives the different-person similarities their
  spread) and a per-person log-normal scale ``s`` (sigma ``SIGMA_P``; "typical" and "unusual"
  faces);
- ``e_face ~ N(0, B/128 I)`` scaled by a per-face log-normal ``t`` (sigma ``SIGMA_E``; image
  quality: a blurry or turned face is farther from everyone of its own person).

A fixed random rotation is applied at the end (similarities do not change).

Fit (``python bench/synthetic_people.py --fit`` reproduces it)
--------------------------------------------------------------
The five parameters were fitted (Nelder-Mead on the 1/5/10/25/50/75/90/95/99th percentiles of
both distributions, the tails that decide clustering weighted up: the lower ones of same-person
pairs, the upper ones of different-person pairs) to the cosine similarities of dlib's reference
descriptors (``shared/data/reference/dlib_descriptors.json``, L2-normalised) on the shared
verification pairs (``shared/data/faces/MANIFEST.json`` ``pairs``: 382 same, 1,621 different):

==========  ======  ======  ======  ======  ======  ======  ======  ======
pairs       mean    std     p1      p5      p25     p50     p95     p99
==========  ======  ======  ======  ======  ======  ======  ======  ======
same real   0.9724  0.0113  0.9325  0.9492  0.9672  0.9741  0.9876  0.9929
same synth  0.9723  0.0133  0.9281  0.9468  0.9663  0.9751  0.9881  0.9912
diff real   0.8094  0.0432  0.7249  0.7382  0.7789  0.8117  0.8778  0.9010
diff synth  0.8184  0.0408  0.7070  0.7457  0.7932  0.8221  0.8778  0.8961
==========  ======  ======  ======  ======  ======  ======  ======  ======

(synthetic: 20,000 pairs of each kind; real same: min 0.9254, max 1.0; real different: max
0.9284.) The real pairs come from ~30
people only, so the far tail of the different-person distribution - which is what decides how
often two of 100,000 people look alike at a million faces - is the model's extrapolation, not a
measurement: the synthetic numbers at 1M faces are a model, not a promise.

People and photos
-----------------
- Faces per person: a discrete power law ``P(s) ~ s**-ZIPF_A`` (a=2), truncated at
  ``min(5000, n/20)``: at 1M faces 177,408 people, 60.9% of them seen once, 90 with 1,000 or
  more faces, the largest 4,871.
- Photos: 75% of photos draw one face, the others 2-6 faces, always of different people (a face
  that would land in a photo with its own person gets a photo of its own): at 1M faces 637,971
  photos, 25.0% of them with 2+ faces.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DIM = 128
# Fitted parameters (module docstring).
A = 0.19287274        # E|P|^2, the spread of people around the cone's axis
BETA = 0.47620971     # spectrum exponent of the person offsets
SIGMA_P = 0.17726818  # log-normal sigma of the per-person offset scale
B = 0.0341133         # E|e|^2, face noise
SIGMA_E = 0.30391782  # log-normal sigma of the per-face noise scale
ZIPF_A = 2.0
MAX_PERSON = 5000
GROUP_PHOTO_SIZES = np.array([1, 2, 3, 4, 5, 6])
GROUP_PHOTO_PROBS = np.array([0.75, 0.09, 0.07, 0.04, 0.03, 0.02])

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def _rotation(dim: int = DIM) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(12345).standard_normal((dim, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def person_sizes(n_faces: int, rng: np.random.Generator, max_size: int | None = None) -> np.ndarray:
    """Faces per person, power law, summing to exactly n_faces."""
    if max_size is None:
        max_size = int(max(2, min(MAX_PERSON, n_faces // 20)))
    s = np.arange(1, max_size + 1)
    p = s ** -ZIPF_A
    p /= p.sum()
    mean = (s * p).sum()
    sizes = rng.choice(s, size=int(n_faces / mean * 1.2) + 10, p=p)
    cs = np.cumsum(sizes)
    k = int(np.searchsorted(cs, n_faces))
    sizes = sizes[: k + 1].copy()
    sizes[-1] -= cs[k] - n_faces
    sizes = sizes[sizes > 0]
    return rng.permutation(sizes)


def _photos(person: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(person)
    order = rng.permutation(n)
    sizes = rng.choice(GROUP_PHOTO_SIZES, size=n, p=GROUP_PHOTO_PROBS)
    photo_of_slot = np.repeat(np.arange(n), sizes)[:n]
    keys = np.empty(n, np.int64)
    keys[order] = photo_of_slot
    # Never two faces of one person in one photo: later duplicates get photos of their own.
    pair = keys * (person.max() + 1) + person
    _, first = np.unique(pair, return_index=True)
    dup = np.ones(n, bool)
    dup[first] = False
    keys[dup] = n + np.arange(int(dup.sum()))
    # Photo ids as opaque int64 (not ordered like the faces).
    uniq, inv = np.unique(keys, return_inverse=True)
    return rng.permutation(len(uniq)).astype(np.int64)[inv]


def embed_people(person: np.ndarray, n_persons: int, rng: np.random.Generator,
                 chunk: int = 262_144) -> np.ndarray:
    lam = np.arange(1, DIM) ** -BETA
    lam = lam / lam.sum() * A
    scale = np.exp(SIGMA_P * rng.standard_normal(n_persons) - SIGMA_P ** 2)
    offsets = np.zeros((n_persons, DIM), np.float32)
    offsets[:, 0] = 1.0
    offsets[:, 1:] = (scale[:, None] * rng.standard_normal((n_persons, DIM - 1)) * np.sqrt(lam)).astype(np.float32)
    rot = _rotation()
    out = np.empty((len(person), DIM), np.float32)
    for lo in range(0, len(person), chunk):
        hi = min(lo + chunk, len(person))
        t = np.exp(SIGMA_E * rng.standard_normal(hi - lo) - SIGMA_E ** 2).astype(np.float32)
        x = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        x *= (t * np.float32(np.sqrt(B / DIM)))[:, None]
        x += offsets[person[lo:hi]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = x @ rot
    return out


def generate(n_faces: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings float32 (n,128) unit, person int64 (n,), image_keys int64 (n,)).

    Faces come in random order (not grouped by person or photo)."""
    rng = np.random.default_rng(seed)
    sizes = person_sizes(n_faces, rng)
    person = rng.permutation(np.repeat(np.arange(len(sizes), dtype=np.int64), sizes))
    emb = embed_people(person, len(sizes), rng)
    return emb, person, _photos(person, rng)


# ---------------------------------------------------------------------------------------------
# Measuring the real distributions and the fit (python bench/synthetic_people.py [--fit])

QUANTILES = np.array([1, 5, 10, 25, 50, 75, 90, 95, 99])


def real_pair_similarities(shared: Path = SHARED) -> dict[bool, np.ndarray]:
    ref = json.loads((shared / "data/reference/dlib_descriptors.json").read_text())["descriptors"]
    pairs = json.loads((shared / "data/faces/MANIFEST.json").read_text())["pairs"]
    vec = {k: np.asarray(v, np.float64) / np.linalg.norm(v) for k, v in ref.items()}
    return {same: np.array([vec[p["a"]] @ vec[p["b"]] for p in pairs if p["same"] == same])
            for same in (True, False)}


def synthetic_pair_similarities(n_pairs: int = 20_000, seed: int = 1) -> dict[bool, np.ndarray]:
    rng = np.random.default_rng(seed)
    person = np.repeat(np.arange(n_pairs, dtype=np.int64), 2)
    emb = embed_people(person, n_pairs, rng).reshape(n_pairs, 2, DIM)
    perm = rng.permutation(n_pairs)
    return {True: (emb[:, 0] * emb[:, 1]).sum(1), False: (emb[:, 0] * emb[perm, 1]).sum(1)}


def _fit(real: dict[bool, np.ndarray]) -> np.ndarray:
    from scipy.optimize import minimize

    rq = {k: np.percentile(v, QUANTILES) for k, v in real.items()}
    rng = np.random.default_rng(0)
    n = 3000
    zp, zs = rng.standard_normal((n, DIM - 1)), rng.standard_normal(n)
    ze, zt = rng.standard_normal((n, 2, DIM)), rng.standard_normal((n, 2))
    perm = rng.permutation(n)
    w = np.array([3, 2, 1, 1, 1, 1, 1, 1, 1.0])

    def loss(th):
        a, beta, sp, b, se = np.exp(th[0]), th[1], np.exp(th[2]), np.exp(th[3]), np.exp(th[4])
        lam = np.arange(1, DIM) ** -beta
        lam = lam / lam.sum() * a
        pers = np.zeros((n, DIM))
        pers[:, 0] = 1
        pers[:, 1:] = np.exp(sp * zs - sp * sp)[:, None] * zp * np.sqrt(lam)
        x = pers[:, None, :] + np.exp(se * zt - se * se)[..., None] * ze * np.sqrt(b / DIM)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        s, d = (x[:, 0] * x[:, 1]).sum(-1), (x[:, 0] * x[perm, 1]).sum(-1)
        return (((w * (np.percentile(s, QUANTILES) - rq[True]) / 0.011) ** 2).sum()
                + ((w[::-1] * (np.percentile(d, QUANTILES) - rq[False]) / 0.043) ** 2).sum())

    r = minimize(loss, np.array([np.log(0.2), 0.5, np.log(0.2), np.log(0.035), np.log(0.3)]),
                 method="Nelder-Mead", options=dict(maxiter=1500, xatol=1e-4, fatol=1e-5))
    return np.array([np.exp(r.x[0]), r.x[1], np.exp(r.x[2]), np.exp(r.x[3]), np.exp(r.x[4])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="refit the parameters to the shared pairs")
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args()
    real = real_pair_similarities(args.shared)
    if args.fit:
        print("fitted A, BETA, SIGMA_P, B, SIGMA_E:", _fit(real))
    syn = synthetic_pair_similarities()
    print(f"{'pairs':11s} {'n':>6s} {'mean':>7s} {'std':>7s} " + " ".join(f"p{q:<6d}" for q in QUANTILES))
    for same in (True, False):
        for name, v in (("real", real[same]), ("synth", syn[same])):
            print(f"{('same' if same else 'diff') + ' ' + name:11s} {len(v):6d} {v.mean():7.4f} {v.std():7.4f} "
                  + " ".join(f"{x:7.4f}" for x in np.percentile(v, QUANTILES)))
    emb, person, img = generate(1_000_000, 0)
    sizes = np.bincount(person)
    per_img = np.bincount(np.unique(img, return_inverse=True)[1])
    print(f"1M faces: {len(sizes)} people, {np.mean(sizes == 1):.1%} seen once, "
          f"{(sizes >= 1000).sum()} with >= 1000 faces, largest {sizes.max()}; "
          f"{len(per_img)} photos, {np.mean(per_img > 1):.1%} with 2+ faces")


if __name__ == "__main__":
    main()
