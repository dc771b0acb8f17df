"""The seed's backbone: the real InceptionV3 architecture, weights loaded from a file through the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.backbone import BackboneUnavailable
from daemon.config import EX_CONFIG
from plugins import inception_v3


def test_local_weights_file_through_config(tmp_path: Path) -> None:
    import keras

    reference = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg",
                                               input_shape=(299, 299, 3))
    weights = tmp_path / "inception.weights.h5"
    reference.save_weights(str(weights))
    backbone = inception_v3.build(str(weights), tmp_path)
    assert (backbone.dim, backbone.input_size) == (2048, (299, 299))
    images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    features = backbone.embed(images)
    expected = reference.predict_on_batch(images.astype(np.float32) / 127.5 - 1.0)
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(features, expected, atol=1e-4)
    assert backbone.id.startswith("inception_v3/")


def test_missing_or_wrong_weights_file(tmp_path: Path) -> None:
    with pytest.raises(BackboneUnavailable, match="backbone.weights: .* is not a file"):
        inception_v3.build(str(tmp_path / "nope.h5"), tmp_path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(BackboneUnavailable, match="backbone.weights: .* does not hold InceptionV3 weights"):
        inception_v3.build(str(tmp_path / "junk.h5"), tmp_path)


def test_offline_imagenet_download_fails_with_exit_78(tmp_path: Path) -> None:
    """Offline (forced here with a dead proxy, so the test means the same on a connected machine),
    `weights: imagenet` must stop start-up with one line naming the key."""
    (tmp_path / "config.yaml").write_text("backbone: {name: inception_v3}\nhttp: {port: 0}\n")
    run = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                        "https_proxy": "http://127.0.0.1:9"})
    assert run.returncode == EX_CONFIG, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("retraind: backbone.weights: cannot download ImageNet weights for inception_v3")
    assert "set backbone.weights to a local .h5 file" in last
