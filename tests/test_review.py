"""The review API over real HTTP on a real daemon: the queue ordered by doubt with near-duplicates grouped,
decisions as journalled moves that the next training run learns from, undo, suspects, thumbnails, and the
same protection as every state-changing route."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from daemon.app import App
from daemon.review_actions import Plan
from tests.conftest import image_bytes, seed_classes, wait_for, write_image
from tests.test_http_api import JSON, assert_error, call

ALL_TO_REVIEW = {"classify": {"confidence_threshold": 1.0}}  # every inbox image waits for a person


def post(app: App, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], Any]:
    return call(app, "POST", path, json.dumps(body or {}).encode(), JSON)


def in_review(app: App, count: int) -> dict[str, Any]:
    """The queue once `count` images and their records are in review/."""
    review = app.config.folder("review")
    wait_for(lambda: len(list(review.glob("*.json"))) == count, what=f"{count} records in review")
    return call(app, "GET", "/v1/review")[2]  # type: ignore[no-any-return]


def first_model(app: App) -> int:
    return wait_for(lambda: app.serving.version, what="first model").number  # type: ignore[no-any-return]


def test_queue_is_ordered_by_doubt_and_groups_identical_content(tmp_path: Path, run_app: Any) -> None:
    """Kind: a reviewer's time goes first to what the model is least sure of, and one decision covers copies."""
    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        first_model(app)
        inbox = app.config.folder("inbox")
        same = image_bytes("red", 900)
        (inbox / "copy-a.jpg").write_bytes(same)
        (inbox / "copy-b.jpg").write_bytes(same)
        write_image(inbox / "blue-1.jpg", "blue", 901)
        write_image(inbox / "green-1.jpg", "green", 902)
        page = in_review(app, 4)
        assert page["labels"] == ["blue", "red"]
        margins = [group[0]["margin"] for group in page["groups"]]
        assert margins == sorted(margins), "most doubtful (smallest margin) first"
        grouped = [group for group in page["groups"] if len(group) == 2]
        assert len(grouped) == 1 and {item["name"] for item in grouped[0]} == {"copy-a.jpg", "copy-b.jpg"}
        assert grouped[0][0]["duplicates"] == [grouped[0][1]["id"]]
        for group in page["groups"]:
            item = group[0]
            assert item["reason"] in ("low_confidence", "unfamiliar")
            assert [s["label"] for s in item["suggestions"]] and abs(sum(s["score"] for s in item["suggestions"]) - 1) < 1e-3
        paged = call(app, "GET", "/v1/review?offset=1&limit=1")[2]
        assert paged["total_groups"] == 3 and paged["groups"] == page["groups"][1:2]


def test_label_teaches_and_undo_restores(tmp_path: Path, run_app: Any) -> None:
    """Kind: a decision is the daemon's own journalled move; the next training run learns from it (a new
    label included); undo puts the file and its record back."""
    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        version = first_model(app)
        write_image(app.config.folder("inbox") / "leaf.jpg", "green", 7)
        (group,) = in_review(app, 1)["groups"]
        review = app.config.folder("review")
        record = (review / "leaf.jpg.json").read_text()
        code, _, answer = post(app, f"/v1/review/{group[0]['id']}:label", {"label": "green", "group": True})
        assert code == 200, answer
        taught = app.config.folder("classes") / "green" / "leaf.jpg"
        assert taught.exists() and not (review / "leaf.jpg").exists() and not (review / "leaf.jpg.json").exists()
        newer = wait_for(lambda: app.serving.version.number > version and app.serving.version, what="a retrain")
        assert "green" in newer.labels
        code, _, answer = post(app, "/v1/review:undo")
        assert code == 200 and answer["undone"]["kind"] == "label"
        assert (review / "leaf.jpg").exists() and not taught.exists()
        assert (review / "leaf.jpg.json").read_text() == record
        assert_error(post(app, "/v1/review:undo"), 404, "nothing to undo")
        assert app.metrics.registry.get_sample_value("retraind_review_actions_total", {"action": "undo"}) == 1


def test_undo_after_a_labelled_file_was_deleted_leaves_no_orphan_record(tmp_path: Path, run_app: Any) -> None:
    """KIND: undo after the files moved. A labelled image deleted from `classes/<label>/` before the undo
    cannot come back, yet its record was written back into review/ (a record of no image, listed by nothing
    and cleaned by nobody) and the undo said nothing. INPUT: two images labelled at once, one then deleted:
    undo brings back the other with its record, and no record without its image."""
    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        first_model(app)
        for name, seed in (("kept.jpg", 7), ("deleted.jpg", 8)):
            write_image(app.config.folder("inbox") / name, "red", seed)
        items = [item for group in in_review(app, 2)["groups"] for item in group]
        for item in items:
            assert post(app, f"/v1/review/{item['id']}:label", {"label": "red"})[0] == 200
        (app.config.folder("classes") / "red" / "deleted.jpg").unlink()
        assert post(app, "/v1/review:undo")[0] == 200 and post(app, "/v1/review:undo")[0] == 200
    review = app.config.folder("review")
    assert sorted(p.name for p in review.iterdir()) == ["kept.jpg", "kept.jpg.json"]


def test_reject_and_refusals(tmp_path: Path, run_app: Any) -> None:
    """Kind: a rejected image ends in rejected/ with a record; bad labels, unknown ids, cross-site callers and
    non-JSON bodies are refused with a JSON error and nothing moves. A label that `watch.ignore` leaves alone
    (`@eaDir`, `lost+found`: the image was moved there and never trained on) is a bad label too."""
    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        first_model(app)
        write_image(app.config.folder("inbox") / "x.jpg", "red", 11)
        (group,) = in_review(app, 1)["groups"]
        item = group[0]["id"]
        for label in ("../etc", ".hidden", "", " padded", "a/b", 7, "two\nlines", "tab\there", "esc\x1b[2J"):
            assert_error(post(app, f"/v1/review/{item}:label", {"label": label}), 400, "label")
        for label in ("@eaDir", "lost+found", "THUMBS.DB", "$Recycle.Bin"):  # KIND: a folder watch.ignore skips
            assert_error(post(app, f"/v1/review/{item}:label", {"label": label}), 400, "watch.ignore")
            assert not (app.config.folder("classes") / label).exists()
        assert_error(post(app, "/v1/review/0123456789abcdef:label", {"label": "red"}), 404, "no such item")
        assert_error(call(app, "POST", f"/v1/review/{item}:label", b'{"label": "red"}',
                          {"Content-Type": "text/plain"}), 415, "application/json")
        assert_error(call(app, "POST", f"/v1/review/{item}:label", b'{"label": "red"}',
                          {**JSON, "Origin": "http://evil.example"}), 403, "cross-site")
        assert (app.config.folder("review") / "x.jpg").exists()
        assert post(app, f"/v1/review/{item}:reject")[0] == 200
        rejected = app.config.folder("rejected")
        assert (rejected / "x.jpg").exists()
        assert json.loads((rejected / "x.jpg.error.json").read_text())["reason"] == "rejected_by_reviewer"
        assert post(app, "/v1/review:undo")[0] == 200
        assert (app.config.folder("review") / "x.jpg").exists() and not (rejected / "x.jpg.error.json").exists()


def test_suspects_duplicates_keep_and_undo(tmp_path: Path, run_app: Any) -> None:
    """Kind: the same bytes under two labels are shown as suspects; keep hides them, undo shows them again,
    move puts the copy under the other label."""
    seed_classes(tmp_path)
    classes = tmp_path / "data" / "classes"
    shutil.copy(classes / "red" / "red-0.jpg", classes / "blue" / "looks-red.jpg")
    with run_app() as app:
        first_model(app)
        found = wait_for(lambda: [s for s in call(app, "GET", "/v1/suspects")[2]["suspects"]
                                  if s.get("other_labels")], what="suspects with copies under another label")
        # one card per image: the copy under blue may also be a confident out-of-fold disagreement
        assert sorted(s["path"] for s in found) == ["blue/looks-red.jpg", "red/red-0.jpg"]
        copy = next(s for s in found if s["path"] == "blue/looks-red.jpg")
        assert copy["other_labels"] == ["red"]
        assert post(app, f"/v1/suspects/{copy['id']}:keep")[0] == 200
        assert "blue/looks-red.jpg" not in {s["path"] for s in call(app, "GET", "/v1/suspects")[2]["suspects"]}
        assert post(app, "/v1/review:undo")[0] == 200
        assert post(app, f"/v1/suspects/{copy['id']}:move", {"label": "red"})[0] == 200
        assert (classes / "red" / "looks-red.jpg").exists() and not (classes / "blue" / "looks-red.jpg").exists()
        assert_error(post(app, f"/v1/suspects/{copy['id']}:move", {"label": "red"}), 404, "no such item")


def test_a_suspect_named_with_a_unicode_line_separator_is_listed(tmp_path: Path, run_app: Any) -> None:
    """KIND: line-oriented files are split at newlines only. `out_of_fold.jsonl` keeps names as they are
    (JSON escapes a newline but not U+2028/U+2029 or NEL), and it was read back by `str.splitlines()`, which
    breaks lines there too: the row of a training image so named fell apart and the image was never shown as
    a suspect. INPUT: a red picture filed under blue as `odd\u2028name.jpg` beside a plain mislabelled one."""
    seed_classes(tmp_path)
    blue = tmp_path / "data" / "classes" / "blue"
    for name, seed in (("odd\u2028name.jpg", 901), ("plain.jpg", 902)):
        write_image(blue / name, "red", seed=seed)
    with run_app() as app:
        first_model(app)
        suspects = call(app, "GET", "/v1/suspects")[2]["suspects"]
    assert {(s["path"], s["suggested"]) for s in suspects if s["kind"] == "disagrees"} >= {
        ("blue/odd\u2028name.jpg", "red"), ("blue/plain.jpg", "red")}


def test_thumbnails_by_content_and_the_model_view(tmp_path: Path, run_app: Any) -> None:
    """Kind: thumbnails are cached by content hash (never stale), and the model view has the figures."""
    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        first_model(app)
        write_image(app.config.folder("inbox") / "t.jpg", "red", 3)
        (group,) = in_review(app, 1)["groups"]
        sha = group[0]["sha256"]
        assert app.http is not None
        import http.client
        connection = http.client.HTTPConnection("127.0.0.1", app.http.port, timeout=10)
        connection.request("GET", f"/v1/thumbnails/{sha}")
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status == 200 and response.getheader("content-type") == "image/jpeg" and body[:2] == b"\xff\xd8"
        assert (app.config.folder("state") / "thumbnails" / f"{sha}.jpg").read_bytes() == body
        assert_error(call(app, "GET", "/v1/thumbnails/not-a-hash"), 400, "sha256")
        assert_error(call(app, "GET", f"/v1/thumbnails/{'0' * 64}"), 404, "no such item")
        model = call(app, "GET", "/v1/review/model")[2]
        assert model["version"] == app.serving.version.number and model["labels"] == ["blue", "red"]
        assert len(model["confusion_matrix"]) == 2 and set(model["per_class_accuracy"]) == {"blue", "red"}
        paths = call(app, "GET", "/openapi.json")[2]["paths"]
        assert {"/v1/review", "/v1/review/{item_id}:label", "/v1/review:undo", "/v1/suspects"} <= set(paths)


def test_a_decision_interrupted_by_a_stop_is_finished_at_start(tmp_path: Path, run_app: Any) -> None:
    """Kind: a crash between the journal and the move never loses the decision: it is carried out at start."""
    seed_classes(tmp_path)
    data = tmp_path / "data"
    (data / "review").mkdir(parents=True)
    write_image(data / "review" / "late.jpg", "red", 5)
    (data / "review" / "late.jpg.json").write_text("{}")
    from daemon.store import Store
    store = Store(data / "state" / "store.sqlite")
    plan = Plan(moves=[(data / "review" / "late.jpg", data / "classes" / "red" / "late.jpg")],
                removed={data / "review" / "late.jpg.json": "{}"})
    store.review_begin("label", plan.to_json())
    store.close()
    with run_app() as app:
        assert (data / "classes" / "red" / "late.jpg").exists()
        assert not os.path.lexists(data / "review" / "late.jpg.json")
        assert post(app, "/v1/review:undo")[0] == 200
        assert (data / "review" / "late.jpg").exists()


def test_a_thumbnail_never_reads_more_than_the_size_limit(tmp_path: Path, run_app: Any) -> None:
    """KIND: the thumbnail of a review image read the file whole (`read_bytes`), past `watch.max_file_bytes`,
    so a file grown huge in its place (or swapped for a link to a device) filled memory or never ended.
    INPUT: the review image replaced by a sparse file one byte over the limit: a 400 that names the limit."""
    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        first_model(app)
        write_image(app.config.folder("inbox") / "t.jpg", "red", 3)
        (group,) = in_review(app, 1)["groups"]
        (image,) = app.config.folder("review").rglob("t*.jpg")
        with image.open("r+b") as grown:
            grown.truncate(app.config.watch.max_file_bytes + 1)
        assert_error(call(app, "GET", f"/v1/thumbnails/{group[0]['sha256']}"), 400, "above watch.max_file_bytes")


def test_a_name_that_is_not_utf8_is_filed_under_one_that_is_and_can_be_taught(tmp_path: Path, run_app: Any) -> None:
    """KIND: a file whose name is not valid UTF-8 (bytes of another system's encoding) was filed under that
    name: its records held lone surrogate escapes that strict JSON readers refuse, and a reviewer who labelled
    it put it into classes/ under a name training skips. INPUT: b"caf\\xe9.jpg" (Latin-1) dropped into the
    inbox, sent to review, then labelled."""
    import orjson  # a strict reader: lone surrogates are not UTF-8

    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        version = first_model(app)
        write_image(app.config.folder("inbox") / os.fsdecode(b"caf\xe9.jpg"), "green", 7)
        (group,) = in_review(app, 1)["groups"]
        review = app.config.folder("review")
        assert sorted(os.listdir(review)) == ["caf\ufffd.jpg", "caf\ufffd.jpg.json"]
        record = orjson.loads((review / "caf\ufffd.jpg.json").read_bytes())
        assert record["file"] == "caf\ufffd.jpg" and record["destination"] == str(review / "caf\ufffd.jpg")
        code, _, answer = post(app, f"/v1/review/{group[0]['id']}:label", {"label": "green", "group": True})
        assert code == 200, answer
        assert (app.config.folder("classes") / "green" / "caf\ufffd.jpg").exists()
        newer = wait_for(lambda: app.serving.version.number > version and app.serving.version, what="a retrain")
        assert sum(newer.metrics["images"]["green"].values()) == 1
    lines = (tmp_path / "data" / "results.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["file"] for line in lines] == ["caf\ufffd.jpg"]


def test_a_decision_that_cannot_move_its_file_changes_nothing_and_says_why(tmp_path: Path, run_app: Any) -> None:
    """Kind: a decision whose move fails (review/ read-only: a bind mount, so the move to classes/ crosses file
    systems and its copy is made before the source is removed) is undone; the answer names the file and the
    cause; the file is in one place (review/), and the same decision succeeds once the folder is writable."""
    from tests.test_reliability_disk import mount, unmount

    seed_classes(tmp_path)
    with run_app(**ALL_TO_REVIEW) as app:
        first_model(app)
        write_image(app.config.folder("inbox") / "leaf.jpg", "green", 7)
        (group,) = in_review(app, 1)["groups"]
        review, taught = app.config.folder("review"), app.config.folder("classes") / "green"
        mount("--bind", str(review), str(review))
        try:
            mount("-o", "remount,bind,ro", str(review))
            code, _, answer = post(app, f"/v1/review/{group[0]['id']}:label", {"label": "green", "group": True})
            assert code == 503 and "leaf.jpg" in answer["error"] and "Read-only file system" in answer["error"], answer
            assert sorted(p.name for p in review.iterdir()) == ["leaf.jpg", "leaf.jpg.json"]
            assert not list(taught.glob("*")), "a copy was left in classes/: the file is in two places"
        finally:
            unmount(review)
        code, _, answer = post(app, f"/v1/review/{group[0]['id']}:label", {"label": "green", "group": True})
        assert code == 200, answer
        assert [p.name for p in taught.iterdir()] == ["leaf.jpg"] and not list(review.iterdir())
