"""People clustering core (facebatch.clustering) and its metrics, on synthetic and hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bench.synthetic_people import generate
from facebatch import clustering as C
from facebatch.evaluation import bcubed, pairwise_f


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """One OpenMP thread: on a shared 2-core machine two spinning threads are several times
    slower than one (measured: the 20k recall test 86 s vs ~15 s under load 10)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def synth():
    emb, person, img = generate(6000, seed=3)
    graph = C.knn(emb, C.K, exact=True)
    return emb, person, img, graph


def _unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


# --- metrics -------------------------------------------------------------------------------------

def test_bcubed_and_pairwise_hand_computed():
    truth = [0, 0, 0, 1, 1]
    pred = [0, 0, 1, 1, -1]
    # precision per face: 1, 1, 1/2, 1/2, 1 (the -1 is a singleton); recall: 2/3, 2/3, 1/3, 1/2, 1/2
    p, r, f = bcubed(pred, truth)
    assert p == pytest.approx(0.8) and r == pytest.approx(8 / 15) and f == pytest.approx(0.64)
    # pairs: pred {01, 23}, truth {01, 02, 12, 34}, common {01}
    p, r, f = pairwise_f(pred, truth)
    assert (p, r, f) == pytest.approx((0.5, 0.25, 1 / 3))
    assert bcubed(truth, truth) == pytest.approx((1, 1, 1))
    # two -1 never count as one cluster
    assert bcubed([-1, -1], [0, 0]) == pytest.approx((1, 0.5, 2 / 3))
    assert pairwise_f([-1, -1], [0, 0]) == pytest.approx((1, 0, 0))


# --- knn -----------------------------------------------------------------------------------------

def test_knn_self_excluded_and_padding():
    x = _unit(np.random.default_rng(0).standard_normal((5, 128)))
    s, i = C.knn(x, 7)
    assert s.shape == (5, 7) and i.dtype == np.int64 and s.dtype == np.float32
    assert (i[:, :4] != np.arange(5)[:, None]).all() and (i[:, 4:] == -1).all()
    assert np.isneginf(s[:, 4:]).all()
    q = _unit(np.random.default_rng(1).standard_normal((3, 128)))
    s, i = C.knn(x, 2, q)
    ref = np.argsort(-(q @ x.T), axis=1)[:, :2]
    assert (i == ref).all()


def test_knn_approximate_recall_20k():
    """The IVF index at the search setting finds >= 95% of the exact neighbours; the cheaper
    graph setting (GRAPH_NPROBE, GRAPH_K_FACTOR) finds fewer ids but clusters as well as the exact graph."""
    emb, person, img = generate(20_000, seed=1)
    s_ex, i_ex = C.knn(emb, C.K, exact=True)
    index = C.build_search_index(emb, exact=False)
    s_ap, i_ap = C.knn(emb, C.K, index=index, nprobe=C.SEARCH_NPROBE, k_factor=C.SEARCH_K_FACTOR)
    assert C.id_recall(i_ex, i_ap) >= 0.95
    assert C.knn_recall(i_ex, s_ex, i_ap, s_ap) >= 0.95
    s_g, i_g = C.knn(emb, C.K, index=index)                     # graph setting
    f_exact = bcubed(C.cluster(emb, img, knn_graph=(s_ex, i_ex)), person)[2]
    f_graph = bcubed(C.cluster(emb, img, knn_graph=(s_g, i_g)), person)[2]
    assert f_graph >= f_exact - 0.005, (f_graph, f_exact)


def test_search_index_roundtrip(tmp_path):
    emb, _, _ = generate(3000, seed=2)
    for exact in (True, False):
        index = C.build_search_index(emb, exact=exact)
        C.save_index(index, tmp_path / "ix.faiss")
        for loaded in (C.load_index(tmp_path / "ix.faiss"), C.load_index(C.save_index(index))):
            s, i = C.search(loaded, emb[:5], 3)
            assert (i[:, 0] == np.arange(5)).all() and np.allclose(s[:, 0], 1, atol=1e-5)


# --- cluster -------------------------------------------------------------------------------------

def test_cluster_quality_and_cannot_link(synth):
    emb, person, img, graph = synth
    labels = C.cluster(emb, img, knn_graph=graph)
    assert labels.dtype == np.int64 and len(labels) == len(emb)
    assert C.cannot_link_violations(labels, img) == 0
    assert bcubed(labels, person)[2] > 0.97


def test_cannot_link_even_for_identical_faces():
    rng = np.random.default_rng(0)
    centre = _unit(rng.standard_normal(128))
    emb = _unit(centre + 0.01 * rng.standard_normal((12, 128)))   # one person, 12 near-copies
    img = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7])          # photos 0, 1, 7 hold several
    labels = C.cluster(emb, img, threshold=0.9, min_size=1)
    assert C.cannot_link_violations(labels, img) == 0
    assert len(np.unique(labels)) == 3                            # photo 0 forces three people


def test_chain_between_two_groups_is_not_merged():
    """Two tight groups joined by a chain A-B-C of faces, each step just above the threshold:
    single linkage merges everything; average linkage must not."""
    rng = np.random.default_rng(5)
    u = _unit(rng.standard_normal(128))
    v = rng.standard_normal(128)
    v = _unit(v - (v @ u) * u)
    step = np.arccos(0.945)                          # consecutive points at cosine 0.945
    ang = step * np.arange(5)                        # G1 centre, A, B, C, G2 centre
    pts = _unit(np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)
    g1 = _unit(pts[0] + 0.005 * rng.standard_normal((15, 128)))
    g2 = _unit(pts[4] + 0.005 * rng.standard_normal((15, 128)))
    emb = np.concatenate([g1, pts[1:4], g2])
    img = np.arange(len(emb))
    thr = 0.93
    s, i = C.knn(emb, 20, exact=True)
    keep = s.ravel() >= thr
    r = np.repeat(np.arange(len(emb)), 20)[keep]
    n_comp, _ = connected_components(coo_matrix((np.ones(keep.sum()), (r, i.ravel()[keep])),
                                                shape=(len(emb),) * 2), directed=False)
    assert n_comp == 1                               # single linkage: one person
    labels = C.cluster(emb, img, threshold=thr, k=20, min_size=1)
    assert labels[0] >= 0 and labels[-1] >= 0
    assert len(np.unique(labels[:15])) == 1 and len(np.unique(labels[-15:])) == 1
    assert labels[0] != labels[-1]


def test_names_one_cluster_per_name_never_mixed(synth):
    emb, person, img, graph = synth
    big = np.argsort(-np.bincount(person))[:3]
    names = np.full(len(emb), -1, np.int64)
    p0 = np.flatnonzero(person == big[0])
    p1 = np.flatnonzero(person == big[1])
    p2 = np.flatnonzero(person == big[2])
    names[p0[:3]] = 7                                # three faces of one person: "7"
    names[p1[:1]] = 9                                # one face of another: "9"
    names[p2[:2]] = [11, 12]                         # a label contradicting the cluster: split
    labels = C.cluster(emb, img, names=names, knn_graph=graph)
    assert C.cannot_link_violations(labels, img) == 0
    for nm in (7, 9, 11, 12):
        lab = np.unique(labels[names == nm])
        assert len(lab) == 1 and lab[0] >= 0
    for lab in np.unique(labels[labels >= 0]):
        assert len(np.unique(names[(labels == lab) & (names >= 0)])) <= 1
    assert labels[p2[0]] != labels[p2[1]]
    # the named persons still hold most of their faces
    assert np.mean(labels[p0] == labels[p0[0]]) > 0.9
    # a lone named face is a person even below min_size
    lone = np.full(len(emb), -1, np.int64)
    singles = np.flatnonzero(np.bincount(person)[person] == 1)
    lone[singles[0]] = 3
    labels = C.cluster(emb, img, names=lone, knn_graph=graph, min_size=2)
    assert labels[singles[0]] >= 0


def test_centroids():
    emb = _unit(np.random.default_rng(0).standard_normal((6, 128)))
    u, c = C.centroids(emb, np.array([2, 2, -1, 5, 5, 5]))
    assert list(u) == [2, 5]
    assert np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-6)
    assert np.allclose(c[0], _unit(emb[0] + emb[1]), atol=1e-6)


# --- assign --------------------------------------------------------------------------------------

def test_assign_threshold_and_cannot_link():
    rng = np.random.default_rng(0)
    cents = _unit(rng.standard_normal((3, 128)))
    # new faces: close to person 0 (x2, same photo), close to person 1, far from everyone
    new = np.stack([_unit(cents[0] + 0.02 * rng.standard_normal(128)),
                    _unit(cents[0] + 0.03 * rng.standard_normal(128)),
                    _unit(cents[1] + 0.02 * rng.standard_normal(128)),
                    _unit(rng.standard_normal(128))])
    sims = new @ cents.T
    person, sim = C.assign(new, cents, 0.93, image_keys_new=np.array([10, 10, 11, 12]))
    assert person.dtype == np.int64 and sim.dtype == np.float32
    assert np.allclose(sim, sims.max(1), atol=1e-5)
    better = int(np.argmax(sims[:2, 0]))
    assert person[better] == 0 and person[1 - better] == -1      # one photo: the better face wins
    assert person[2] == 1 and person[3] == -1                      # far face: below the threshold
    person, _ = C.assign(new, cents, 0.93)                         # without photos: both go to 0
    assert list(person[:3]) == [0, 0, 1]
    person, _ = C.assign(new, cents, 0.9999)
    assert (person == -1).all()


# --- ray -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_knn_distributed_equals_knn():
    ray = pytest.importorskip("ray")
    emb, _, _ = generate(3000, seed=4)
    q = emb[:500] * 1.0
    started = not ray.is_initialized()  # (another test file's Ray may already run in this process)
    if started:
        ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        for exact in (True, False):
            index = C.build_search_index(emb, exact=exact)
            s, i = C.knn(emb, 5, index=index)
            sd, idd = C.knn_distributed(emb, 5, exact=exact, block_rows=700, index=None if exact else index)
            assert (i == idd).all() and np.allclose(s, sd)
        s, i = C.knn(emb, 4, q, exact=True)
        sd, idd = C.knn_distributed(emb, 4, q, exact=True, block_rows=128)
        assert (i == idd).all() and np.allclose(s, sd)
    finally:
        if started:
            ray.shutdown()


def test_knn_rows_only_searches_rows():
    emb, _, _ = generate(2000, seed=6)
    rows = np.array([5, 100, 1999])
    s, i = C.knn_rows(emb, rows, 4, exact=True)
    full_s, full_i = C.knn(emb, 4, exact=True)
    assert (i[rows] == full_i[rows]).all() and np.allclose(s[rows], full_s[rows])
    others = np.setdiff1d(np.arange(2000), rows)
    assert (i[others] == -1).all()
