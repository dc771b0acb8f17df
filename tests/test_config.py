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
        # KIND: list entries that can never match, accepted silently (the host refused, the probe behind a token)
        ({"http": {"allowed_hosts": ["retraind.example.org", "http://retraind.example.org"]}},
         "http.allowed_hosts[1]: 'http://retraind.example.org' is not a host name"),
        ({"http": {"allowed_hosts": ["retraind.example.org:9721"]}}, "http.allowed_hosts[0]: 'retraind.example.org:9721'"),
        ({"http": {"allowed_hosts": [""]}}, "http.allowed_hosts[0]: '' is not a host name"),
        ({"http": {"paths_without_token": ["/readyz", "healthz"]}}, "http.paths_without_token[1]: 'healthz' is not a path"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_host_names_and_addresses_are_allowed_hosts(tmp_path: Path) -> None:
    hosts = ["retraind.example.org", "*.example.org", "10.0.0.7", "fe80::1", "*"]
    assert parse_config({"http": {"allowed_hosts": hosts}}, tmp_path).http.allowed_hosts == hosts


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
    assert bad.stderr.strip().splitlines() == ["retraind: classify.topk: unknown key (allowed: confidence_threshold, novelty, novelty_false_alarm_rate, target_precision, top_k)"]


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("classify: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "message"), [
    (b"classify:\n  top_k: 5\n\tnovelty: true\n", "line 3, column 1: found character '\\t' that cannot start any token"),
    (b"http:\n  port: 9721\n  host: 127.0.0.1\n  token_file: \"/etc/token\n", ("line 5, column 1: found unexpected end of "
                                                                                  "stream (while scanning a quoted scalar from line 4)")),
    (b"log_level: INFO\n# caf\xe9 (Latin-1)\n", "is not UTF-8 text: line 2 holds the byte 0xe9; save the file as UTF-8"),
])
def test_a_config_file_that_is_not_yaml_names_the_line(tmp_path: Path, text: bytes, message: str) -> None:
    """KIND: a broken config file says where. A tab in the indentation or an unclosed quote gave only PyYAML's
    context ("while scanning for the next token"), no line; a comment saved as Latin-1 was a traceback."""
    (tmp_path / "config.yaml").write_bytes(text)
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "config.yaml")
    assert str(raised.value).startswith(f"config: {tmp_path / 'config.yaml'} ") and str(raised.value).endswith(message)


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        ({"inbox": "classes"}, "folders.inbox: is the same folder as folders.classes"),
        ({"outbox": "inbox/sorted"}, "folders.outbox: lies inside folders.inbox"),
        ({"review": "classes/unsure"}, "folders.review: lies inside folders.classes"),
        ({"classes": "."}, "folders.classes: is data_root itself"),
        ({"state": "rejected/state"}, "folders.state: lies inside folders.rejected"),
    ],
)
def test_overlapping_folders_are_refused(tmp_path: Path, folders: dict[str, str], message: str) -> None:
    """KIND: two of the daemon's folders that are one folder, or one inside the other, or a folder that is the
    data root (which holds all the others). The inbox would move training images out of `classes/`, or take
    the outbox's own results in again without end. INPUT: such a `folders:` section; one error naming the key."""
    with pytest.raises(ConfigError) as info:
        parse_config({"folders": folders}, tmp_path)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_run_refuses_overlapping_folders_before_making_any(tmp_path: Path) -> None:
    """The same through `retraind run`: exit 78, one line, and no folder made."""
    (tmp_path / "config.yaml").write_text("data_root: data\nfolders:\n  inbox: classes\n")
    run = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == EX_CONFIG, run.stderr
    assert run.stderr.strip().splitlines() == [
        ("retraind: folders.inbox: is the same folder as folders.classes "
         f"({tmp_path / 'data' / 'classes'}); give each folder its own place")]
    assert not (tmp_path / "data").exists()


def test_folders_outside_the_data_root_are_fine(tmp_path: Path) -> None:
    config = parse_config({"folders": {"state": str(tmp_path / "private"), "inbox": "drop"}}, tmp_path)
    assert config.folder("state") == tmp_path / "private"
    assert config.folder("inbox") == tmp_path / "data" / "drop"


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """KIND: a key written twice in one mapping, e.g. a user appends `http: {port: 9871}` below the shipped
    config.yaml, which lists `http:` already. YAML parsers keep the last silently, so the earlier section's
    edits would vanish. INPUT: that file; `retraind run` exits 78 naming the key and both lines."""
    shipped = (REPO / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(shipped + "\nhttp:\n  port: 9871\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "config.yaml")
    first = 1 + shipped.splitlines().index("http:")
    second = len(shipped.splitlines()) + 2
    assert str(info.value) == (f"http: given twice in {tmp_path / 'config.yaml'} (lines {first} and {second}); "
                               "keep one")
    (tmp_path / "config.yaml").write_text("classify:\n  top_k: 3\n  novelty: false\n  top_k: 4\n")
    run = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == EX_CONFIG
    assert run.stderr.strip().splitlines() == [
        "retraind: classify.top_k: given twice in config.yaml (lines 2 and 4); keep one"]


def test_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    """KIND: YAML 1.2 numbers that PyYAML (YAML 1.1: a float needs a dot) reads as text. `l2: [1e-4, 1e-3]`, as
    ML papers and retrain.py's flags write strengths, was `training.l2[0]: expected float, got str '1e-4'`, and
    `max_file_bytes: 6.4e7` an error too. INPUT: those values in a config file; they load as the numbers."""
    (tmp_path / "config.yaml").write_text("training:\n  l2: [1e-4, 1E-3, 1.e-2]\n  quiet_period_seconds: 5e-1\n"
                                          "watch:\n  max_file_bytes: 6.4e7\n", encoding="utf-8")
    config = load_config(tmp_path / "config.yaml")
    assert config.training.l2 == [1e-4, 1e-3, 1e-2] and config.training.quiet_period_seconds == 0.5
    assert config.watch.max_file_bytes == 64_000_000 and isinstance(config.watch.max_file_bytes, int)
    with pytest.raises(ConfigError, match=r"^classify.top_k: expected int, got float 2.5$"):
        parse_config({"classify": {"top_k": 2.5}}, tmp_path)


def test_paths_start_at_home_and_at_the_configs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KIND: a path-valued key not read as the config says ("relative paths are relative to this file's
    folder"). `~/...` was taken literally: `data_root: ~/photos` failed naming a folder `~` beside the config,
    and `folders: {inbox: ~/Downloads}` silently made `<data_root>/~/Downloads`; a relative `backbone.weights`
    was opened from the working directory (`/` under systemd), not the config's folder. INPUT: those values."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    config = parse_config({"data_root": "~/photos", "folders": {"inbox": "~/Downloads"},
                           "backbone": {"weights": "weights/lite0.pth"}, "http": {"token_file": "~/token"},
                           "publish": {"tf_serving_base_path": "~/tf"}}, tmp_path / "etc")
    assert config.data_root == home / "photos"
    assert config.folder("inbox") == home / "Downloads" and config.folder("classes") == home / "photos" / "classes"
    assert config.backbone.weights == str(tmp_path / "etc" / "weights" / "lite0.pth")
    assert config.http.token_file == str(home / "token") and config.publish.tf_serving_base_path == str(home / "tf")
    assert parse_config({}, tmp_path).backbone.weights == "imagenet"
