"""The `retraind` command line, in-process through `main()` with the tiny backbone as an extra plugin: status from
the running daemon's API and from the state dir, one-shot classify, retrain, report, and its exit statuses."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon import __version__
from daemon.cli import EX_CANTCREAT, EX_UNAVAILABLE, main
from daemon.config import EX_CONFIG
from tests.conftest import make_config, seed_classes, wait_for, write_image
from tests.tiny_backbone import TinyBackbonePlugin


def write_config(root: Path, **sections: Any) -> Path:
    """`make_config`'s test config as a YAML file, for the command line."""
    raw = dataclasses.asdict(make_config(root, **sections))
    raw["data_root"] = str(raw["data_root"])
    raw["plugins"] = {"disable": raw["plugins"]["disable"], **raw["plugins"]["settings"]}  # as a user writes it
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run(config: Path, *args: str, plugins: tuple[object, ...] = ()) -> int:
    return main(["--config", str(config), *args], plugins=plugins)


@pytest.fixture
def trained(tmp_path: Path, run_app: Any) -> Path:
    """A data root whose daemon trained a red/blue model and stopped; returns the config file."""
    seed_classes(tmp_path)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
    return write_config(tmp_path)


def test_status_from_the_state_dir(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "data" / "inbox" / "waiting.jpg", "red", seed=1)
    assert run(trained, "status") == 0
    out = capsys.readouterr().out
    assert "state dir" in out and "version 1, 2 labels, backbone tiny/seed7/v1" in out
    assert "inbox:         1 file waiting" in out and "last training:" in out
    # the calibrator's parameters as `name=value`, not a Python dict's repr
    calibration = r"^calibration:\s+temperature \(temperature=\d+(\.\d+)?\), error \(ECE\)"
    assert re.search(calibration, out, re.MULTILINE), out
    assert "{" not in out
    assert run(trained, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["model"]["version"] == 1 and status["model"]["labels"] == ["blue", "red"]
    assert sum(status["images"]["red"].values()) == 12 and status["training_runs"] is None


def test_status_from_the_running_daemon(tmp_path: Path, run_app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    seed_classes(tmp_path)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        wait_for(lambda: app.trainer.runs, what="the run to be counted")
        assert app.http is not None
        config = write_config(tmp_path, http={"port": app.http.port})
        assert run(config, "status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["source"] == f"daemon at http://127.0.0.1:{app.http.port}"
        assert status["model"]["version"] == 1 and status["training_runs"]["promoted"] == 1
        assert status["images"]["blue"]["train"] + status["images"]["blue"]["validation"] == 12
        assert status["inbox_pending"] == 0 and status["last_training"] > 0

        assert run(config, "retrain") == 0  # nothing changed since model 1: nothing to do
        assert capsys.readouterr().out == ("training set unchanged since model 1 was trained: nothing new to "
                                           "publish\n")
        assert app.trainer.runs == 1 and app.registry.versions() == [1]


def test_without_a_model_or_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    config = write_config(tmp_path)
    assert run(config, "status") == 1
    assert "none yet" in capsys.readouterr().out
    for command in (["report"], ["classify", "x.jpg"]):
        assert run(config, *command) == 1
        err = capsys.readouterr().err
        assert err.startswith("retraind: no model yet") and err.count("\n") == 1
    assert run(config, "retrain") == EX_UNAVAILABLE
    err = capsys.readouterr().err
    assert "no daemon answers at http://127.0.0.1:0" in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["labels", "head", "metrics"])
def test_a_model_that_cannot_be_loaded_is_one_line(trained: Path, tmp_path: Path, damage: str, run_app: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: the published version cannot be read back (its files damaged or out of step: a `labels.txt` with
    a line more than the head has outputs, a truncated `head.npz`, a `metrics.json` cut short). The daemon
    logs it and trains anew; the commands that read the model printed a traceback. INPUT: each damage, then
    `classify`, `report` and `status`: one line naming the version folder and the problem, exit status 1."""
    folder = tmp_path / "data" / "state" / "models" / "1"
    target = {"labels": folder / "labels.txt", "head": folder / "head.npz", "metrics": folder / "metrics.json"}
    if damage == "labels":
        target[damage].write_text(target[damage].read_text() + "extra\n")
    else:
        target[damage].write_bytes(target[damage].read_bytes()[:40])
    image = write_image(tmp_path / "x.jpg", "red", seed=5)
    for command in (["classify", str(image)], ["report"], ["status"]):
        assert run(trained, *command) == 1, command
        err = capsys.readouterr().err
        assert err.startswith(f"retraind: the published model {folder} cannot be loaded: "), err
        assert err.count("\n") == 1, err
    with run_app() as app:  # the daemon logs it and trains a new version (a truncated head.npz stopped it)
        assert wait_for(lambda: app.serving.version, what="a new model").number == 2


def test_config_error_is_one_line_and_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("classify:\n  top_k: many\n")
    assert run(config, "status") == EX_CONFIG
    assert capsys.readouterr().err == "retraind: classify.top_k: expected int, got str 'many'\n"


def test_folders_that_cannot_be_made_and_a_missing_token_file_are_config_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: a config problem found only when the daemon starts is one line naming the key, exit status 78,
    and `check-config` finds it too. A data_root that is a file (or a state folder that is one, or a folder in
    a read-only place) was a traceback and exit status 1 from `run` and `check-config`; a token file that
    does not exist passed `check-config`, and `run` then refused it."""
    (tmp_path / "file").write_text("not a folder")
    config = tmp_path / "config.yaml"
    for text, message in (
            (f"data_root: {tmp_path / 'file'}\n", f"retraind: folders.classes: cannot create {tmp_path / 'file' / 'classes'}: "),
            (f"folders: {{state: {tmp_path / 'file'}}}\n", f"retraind: folders.state: cannot create {tmp_path / 'file'}: ")):
        config.write_text(text)
        assert run(config, "check-config", plugins=(TinyBackbonePlugin(),)) == EX_CONFIG
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
        # `run` in its own process: in this one it would leave its log handler on this test's captured stderr
        daemon = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), "run"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120, check=False)
        assert daemon.returncode == EX_CONFIG and daemon.stderr.startswith(message), daemon.stderr
        assert daemon.stderr.count("\n") == 1, daemon.stderr
    config.write_text(f"http: {{token_file: {tmp_path / 'no-token'}}}\n")
    assert run(config, "check-config", plugins=(TinyBackbonePlugin(),)) == EX_CONFIG
    assert capsys.readouterr().err.startswith(f"retraind: http.token_file: cannot read {tmp_path / 'no-token'}: ")


def test_classify_files(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    red = write_image(tmp_path / "red.jpg", "red", seed=77)
    blue = write_image(tmp_path / "blue.png", "blue", seed=78, fmt="PNG")
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    assert run(trained, "classify", str(red), str(blue), plugins=(TinyBackbonePlugin(),)) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    # calibrated scores: the tiny backbone separates colours perfectly, so they may round to 1.00000
    assert lines[0] == f"{red}:" and re.fullmatch(r"  red \(score = [01]\.\d{5}\)", lines[1])
    assert lines[3] == f"{blue}:" and re.fullmatch(r"  blue \(score = [01]\.\d{5}\)", lines[4])
    assert captured.err == "", "no progress bar when stderr is not a terminal"
    assert run(trained, "classify", str(junk), plugins=(TinyBackbonePlugin(),)) == 1
    assert capsys.readouterr().out.startswith(f"{junk}: rejected (unsupported)")


def test_classify_a_folder_says_it_is_a_folder(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: a reject names what the path is. `retraind classify photos/` (a folder, where files are expected)
    said `photos is a link to the folder photos; links to folders are not followed`: it is no link. A real
    link to a folder keeps its own message."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (tmp_path / "linked").symlink_to(folder)
    assert run(trained, "classify", str(folder), str(tmp_path / "linked"), plugins=(TinyBackbonePlugin(),)) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{folder}: rejected (unsupported): {folder} is a folder, not a file",
        (f"{tmp_path / 'linked'}: rejected (unsupported): {tmp_path / 'linked'} is a link to the folder {folder}; "
         "links to folders are not followed; move or copy the folder here instead")]


def test_progress_bar_on_a_terminal(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(write_image(tmp_path / f"in{i}.jpg", "red", seed=i)) for i in range(3)]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert run(trained, "classify", *files, plugins=(TinyBackbonePlugin(),)) == 0
        terminal.flush()
    shown = b""
    while select.select([master], [], [], 0.5)[0]:
        try:
            shown += os.read(master, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
    os.close(master)
    assert b"classifying" in shown and b"/3 [" in shown
    assert capsys.readouterr().out.count("(score = ") == 6


def test_report(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "model.html"
    assert run(trained, "report", "--out", str(out)) == 0
    assert capsys.readouterr().out == f"wrote {out} (model 1)\n"
    assert "<h1>retraind model 1</h1>" in out.read_text(encoding="utf-8")


def test_an_output_that_cannot_be_written_is_one_line(trained: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: `--out` where nothing can be written (a folder, a path below a file) was a traceback and exit
    status 1 from `report` (and `export`: tests/test_export.py). Now one line naming the path and the cause,
    exit status 73 (EX_CANTCREAT), and nothing left behind."""
    (tmp_path / "a-file").write_text("x")
    for out, cause in ((tmp_path, "Is a directory"), (tmp_path / "a-file" / "r.html", "File exists")):
        before = sorted(tmp_path.iterdir())
        assert run(trained, "report", "--out", str(out)) == EX_CANTCREAT
        err = capsys.readouterr().err
        assert err == f"retraind: cannot write {out}: {cause}\n", err
        assert sorted(tmp_path.iterdir()) == before  # the temporary file is gone too


def test_report_goes_beside_the_data_by_default(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # wherever the command is typed, the report lands beside the data
    assert run(trained, "report") == 0
    out = tmp_path / "data" / "report.html"
    assert capsys.readouterr().out == f"wrote {out} (model 1)\n"
    assert "<h1>retraind model 1</h1>" in out.read_text(encoding="utf-8")
    assert not list(elsewhere.iterdir())


def test_config_flag_before_or_after_the_command() -> None:
    """The unit runs `retraind run --config FILE`; `retraind --config FILE run` works too."""
    from daemon.cli import build_parser

    assert build_parser().parse_args(["run", "--config", "a.yaml"]).config == "a.yaml"
    assert build_parser().parse_args(["--config", "b.yaml", "status", "--json"]).config == "b.yaml"
    assert build_parser().parse_args(["check-config"]).config is None


def test_port_in_use_is_a_config_error(tmp_path: Path, tiny: Any) -> None:
    import socket

    from daemon.app import App
    from daemon.config import ConfigError
    from tests.conftest import make_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = make_config(tmp_path, http={"port": taken.getsockname()[1]})
        with pytest.raises(ConfigError, match=r"^http.port: cannot listen on 127.0.0.1:\d+"):
            App(config, extra_plugins=(tiny,))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """KIND: the usual first command of a new user, `retraind --version`, was a usage error (status 2). INPUT:
    that flag; it prints the version `retraind_build_info` and `GET /v2` report, and exits 0."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"retraind {__version__}\n"


def test_the_inbox_backlog_is_counted_in_words_that_agree() -> None:
    """KIND: `retraind status` and the systemd STATUS line said "1 files waiting". INPUT: one inbox file waiting,
    then two."""
    from daemon.app import DaemonStatus
    from daemon.service import ServiceProgress, status_line

    line = status_line(DaemonStatus(3, 1, Path("classes")), ServiceProgress())
    assert line == "serving model 3; 1 file waiting in the inbox"
    assert status_line(DaemonStatus(3, 2, Path("classes")), ServiceProgress()).endswith("; 2 files waiting in the inbox")
    assert status_line(DaemonStatus(3, 0, Path("classes")), ServiceProgress()) == "serving model 3"
