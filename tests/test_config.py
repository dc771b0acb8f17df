"""Config: defaults that just work, and one-line errors that name the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import EX_CONFIG, ConfigError, load_config, parse_config
from tests.conftest import Lite0Conversion

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_the_defaults(tmp_path: Path) -> None:
    shipped = load_config(REPO / "config.yaml")
    defaults = parse_config({}, REPO)
    assert shipped == defaults
    assert shipped.backbone.name == "efficientnet_lite0"
    assert shipped.data_root == REPO / "data"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"training": {"quiet_period": 3}}, "training.quiet_period: unknown key"),
        ({"classify": {"top_k": "five"}}, "classify.top_k: expected int, got str"),
        ({"classify": {"top_k": True}}, "classify.top_k: expected int, got bool"),
        ({"classify": {"confidence_threshold": 2}}, "classify.confidence_threshold: 2.0 is out of range"),
        ({"backbone": {"engine": "cuda"}}, "backbone.engine: 'cuda' is not one of auto, keras, tflite"),
        ({"training": {"l2": 0.1}}, "training.l2: expected a list"),
        ({"training": {"l2": []}}, "training.l2: give one or more L2 strengths >= 0"),
        ({"training": {"l2": [0.1, -1.0]}}, "training.l2: give one or more L2 strengths >= 0"),
        ({"backbone": "inception_v3"}, "backbone: expected a mapping"),
        ({"data_root": "/no/such/parent/data"}, "data_root: parent folder /no/such/parent does not exist"),
        ({"split": {"validation_percentage": 60, "testing_percentage": 40}}, "split: validation_percentage"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_int_where_float_expected_is_accepted(tmp_path: Path) -> None:
    assert parse_config({"watch": {"settle_seconds": 2}}, tmp_path).watch.settle_seconds == 2.0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`check-config` builds the default backbone, converting it to TFLite in a fresh state dir: about 30 s on
    an idle 2-core machine, well over a minute on a busy one."""
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def test_check_config_cli(tmp_path: Path, lite0_conversion: Lite0Conversion) -> None:
    shutil.copytree(lite0_conversion.weights, tmp_path / "data" / "state" / "weights")  # converted already
    (tmp_path / "config.yaml").write_text("classify:\n  top_k: 3\n")
    ok = _cli("check-config", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "config OK" in ok.stdout
    (tmp_path / "config.yaml").write_text("classify:\n  topk: 3\n")
    bad = _cli("check-config", cwd=tmp_path)
    assert bad.returncode == EX_CONFIG
    assert bad.stderr.strip().splitlines() == ["retraind: classify.topk: unknown key (allowed: confidence_threshold, novelty, target_precision, top_k)"]


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("classify: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
