"""Inputs that must be trusted before use: pickled model weights, and the pipeline version's material."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from facebatch import models, versions
from facebatch.config import IndexConfig, pipeline_version, version_material


def test_pickled_weights_are_checked_against_pinned_hashes(tmp_path, monkeypatch):
    from facebatch.detector import load_mtcnn_weights

    paths = models.mtcnn_weight_paths()
    for path in paths.values():
        assert models.check_pickled_weights(path) == models.PINNED_SHA256[path.name]
    # A file that is not the wheel's: refused before it is unpickled, with the way out in the message.
    evil = tmp_path / "pnet.lz4"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    tampered = dict(paths, pnet=evil)
    monkeypatch.delenv(models.TRUSTED_WEIGHTS_ENV, raising=False)
    with pytest.raises(models.UntrustedWeights, match=r"refusing to load .*pnet.lz4: its SHA-256 [0-9a-f]{64} is not the pinned hash.*FACEBATCH_TRUSTED_WEIGHTS_SHA256="):
        load_mtcnn_weights(tampered)
    # A user's own (here: a copy of the real) weights under another name are allowed explicitly.
    own = tmp_path / "my-pnet.lz4"
    shutil.copy(paths["pnet"], own)
    with pytest.raises(models.UntrustedWeights, match="no pinned file of this name"):
        load_mtcnn_weights(dict(paths, pnet=own))
    sha = models.sha256_file(own)
    assert set(load_mtcnn_weights(dict(paths, pnet=own), trusted_sha256=[sha])) == {"pnet", "rnet", "onet"}
    monkeypatch.setenv(models.TRUSTED_WEIGHTS_ENV, f"{'0' * 64}, {sha}")
    assert set(load_mtcnn_weights(dict(paths, pnet=own))) == {"pnet", "rnet", "onet"}


def test_pipeline_version_covers_the_pixel_limit_and_the_code(monkeypatch):
    hashes = {"mtcnn_pnet": "a", "dlib_resnet_v1": "b"}
    base = IndexConfig(source="/s", out="/o")
    v = pipeline_version(hashes, base)
    assert pipeline_version(hashes, dataclasses.replace(base, max_pixels=50_000_000)) != v
    assert pipeline_version(hashes, dataclasses.replace(base, batch_size=7)) == v  # sizing changes no result
    # nvJPEG's pixels are not libjpeg's: its rows are another version (and existing versions stay).
    assert pipeline_version(hashes, dataclasses.replace(base, gpu_jpeg_decode=True)) != v
    # A version must not change under users who do not use the new option (every object would
    # be reindexed): without it, the hashed material has exactly the keys it had before.
    assert set(version_material(hashes, base)) == {"models", "detector", "max_side", "max_pixels", "code", "embed",
                                                   "schema"}
    for name in ("DETECTOR_CODE_VERSION", "ALIGNMENT_CODE_VERSION", "DECODER_CODE_VERSION", "EMBEDDER_CODE_VERSION"):
        with monkeypatch.context() as m:
            m.setattr(versions, name, getattr(versions, name) + 1)
            assert pipeline_version(hashes, base) != v, name
    assert pipeline_version(hashes, base) == v

