"""The routing benchmark on a short sequence: selectors fitted in turn, routed as the server routes."""

from __future__ import annotations

import json

import pytest
import torch

from clipbank.cli import main
from model_store.reference import find_reference, load_reference
from model_store.selector import SelectorConfig, score
from training.routing import Embeddings, RoutingConfig, fit_sequence, probes_of, routes, run_routing
from training.routing_report import routing_keys, write_routing_report

SHORT = RoutingConfig(kinds=("autoencoder", "discriminative"), sequence=("digits", "arrows"), near=("glyphs-other",))


@pytest.fixture(scope="module")
def result(backbone):
    return run_routing(backbone, find_reference(backbone), SHORT)


def test_every_kind_reports_its_curve_near_and_plain_fallback_and_cost(result):
    for kind in SHORT.kinds:
        r = result[kind]
        assert [c["tasks"] for c in r["curve"]] == [1, 2]
        assert set(r["near_ood"]) == {"glyphs-other"} and 0 <= r["plain_ood"] <= 1
        assert set(r["long"]["own"]) == {"digits", "arrows"}
        assert r["long"]["own"]["digits"] > 0.9  # a domain far from every other is routed to its task
        assert 0 < r["cost"]["selectors_vs_frozen"] < 0.5


def test_routes_match_the_servers_rule(backbone):
    emb = Embeddings(backbone)
    selectors, _ = fit_sequence(emb, "autoencoder", SHORT, None)
    feats = emb("digits", "test")
    scores = torch.stack([score(s, feats) for s in selectors], dim=1)
    want = torch.where(scores.min(1).values <= 1, scores.argmin(1), torch.full((len(feats),), -1))
    assert torch.equal(routes(selectors, feats), want)
    assert len(probes_of(emb("digits", "val"), 50)) == 50


def test_report_files(result, tmp_path):
    routing = routing_keys(result, "autoencoder")
    assert set(routing["near_ood"]) == {"glyphs-other"} and {"task_accuracy", "zero_shot_fallback"} <= set(
        routing["long"]
    )
    paths = write_routing_report(routing, tmp_path, "test")
    assert all(p.exists() for p in paths)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["routing"]["kinds"]) == set(SHORT.kinds)
    assert saved["routing"]["outside"] == SHORT.outside  # the plot's right panel is that domain's fallback
    assert f"Machine: {saved['machine_facts']['cpu']}" in (tmp_path / "report.md").read_text()


def test_the_cli_builds_a_reference_set_from_any_image_folder(tmp_path, backbone, capsys):
    from training.reference_images import outside_images

    (tmp_path / "imgs" / "deep").mkdir(parents=True)
    for i, img in enumerate(outside_images(6, seed=1)):
        img.save(tmp_path / "imgs" / ("deep" if i % 2 else "") / f"{i}.png")
    out = tmp_path / "ref.safetensors"
    assert main(["reference", "build", "--images", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    assert len(load_reference(out, backbone)) == 6
    said = capsys.readouterr()
    assert "6 images is a small reference set" in said.err  # written, and said to be thin
    # its source names the folder (a newcomer's `reference list` read "31 images	31 images")
    assert f"wrote 6 embeddings of the images under {(tmp_path / 'imgs').resolve()} for" in said.out
    assert main(["reference", "build", "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "none: no such folder" in capsys.readouterr().err
    (tmp_path / "imgs" / ".thumbnails").mkdir()  # hidden folders are not the user's images
    outside_images(1, seed=2)[0].save(tmp_path / "imgs" / ".thumbnails" / "t.png")
    outside_images(1, seed=3)[0].save(tmp_path / "imgs" / "._x.png")
    assert main(["reference", "build", "--images", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    assert len(load_reference(out, backbone)) == 6
    assert "(replaced)" in capsys.readouterr().out  # a rebuild replaces the reference set, and says so
    (tmp_path / "empty").mkdir()
    assert main(["reference", "build", "--images", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no images under" in capsys.readouterr().err


def test_reference_build_names_every_unreadable_file_and_can_skip_them(tmp_path, backbone, capsys):
    """The first bad file stopped the build after the backbone loaded, naming only it; there was no way past it."""
    from training.reference_images import outside_images

    (tmp_path / "imgs" / "deep").mkdir(parents=True)
    for i, img in enumerate(outside_images(3, seed=1)):
        img.save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "imgs" / "deep" / "text.jpg").write_text("not a picture")
    out, build = tmp_path / "ref.safetensors", ["reference", "build", "--images", str(tmp_path / "imgs")]
    assert main([*build, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 of 5 images cannot be used" in err and "cut.png" in err and "text.jpg" in err and "--skip-bad" in err
    assert not out.exists()
    assert main([*build, "--out", str(out), "--skip-bad"]) == 0
    assert len(load_reference(out, backbone)) == 3


def test_reference_build_refuses_to_overwrite_a_file_that_is_not_a_reference_set(tmp_path, capsys):
    kept = tmp_path / "model.safetensors"
    kept.write_bytes(b"someone's weights")
    assert main(["reference", "build", "--generated", "--limit", "4", "--out", str(kept)]) == 2
    assert "exists and is not a reference set" in capsys.readouterr().err
    assert kept.read_bytes() == b"someone's weights"
    with pytest.raises(SystemExit) as e:  # both sources: the one it would have used was not said
        main(["reference", "build", "--generated", "--images", str(tmp_path), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_selector_config_knows_the_discriminative_kind():
    assert SelectorConfig(kind="discriminative").hidden == 64
    with pytest.raises(ValueError, match="kind must be one of"):
        SelectorConfig(kind="oracle")


def test_the_routing_benchmark_shows_its_progress_over_the_kinds(backbone, monkeypatch, capsys):
    """`clipbank bench routing` printed nothing for its minute (an outside check of the benchmarks); then, with a
    bar over the kinds alone, nothing for 9 minutes of a busy machine: it counts each kind's tasks."""
    import training.routing as routing

    final = {k + s: {} for k in ("task_accuracy", "own") for s in ("", "_labels")}
    final.update({f"fallback{s}": {"glyphs-other": 1.0, "shapes": 1.0} for s in ("", "_labels")})

    def fit(emb, kind, cfg, reference, done=None):
        for _ in cfg.sequence:
            done()
        return [], [final]

    monkeypatch.setattr(routing, "fit_sequence", fit)
    monkeypatch.setattr(routing, "selector_cost", lambda *a: {})
    run_routing(backbone, None, SHORT, progress=True)
    lines = capsys.readouterr().err.splitlines()
    total = len(SHORT.kinds) * len(SHORT.sequence)
    assert lines[0].startswith("bench routing:   0%") and f"{total}/{total}" in lines[-1], lines
    run_routing(backbone, None, SHORT)  # inside `bench cl`, whose own bar shows the parts
    assert capsys.readouterr().err == ""
