"""Gallery index and search engine: incremental, verified, never stale; results equal brute force."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgur.files import read_checked_image, read_image
from lgur.model.checkpoint import checkpoint_fingerprint, read_card, save_checkpoint
from lgur.model.lgur import LGUR
from lgur.search.engine import SearchEngine
from lgur.search.index import index_file, load_index, merge_shards, scan_gallery, update_index
from lgur.search.query import QueryError
from tests.conftest import REPO, tiny_config

SHIPPED_CHECKPOINT = REPO / "assets" / "lgur_cpu.safetensors"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = LGUR(tiny_config()).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture()
def gallery(tmp_path: Path) -> Path:
    folder = tmp_path / "gallery"
    (folder / "sub").mkdir(parents=True)
    shipped = sorted((REPO / "gallery" / "images").glob("*.jpg"))[:8]
    for i, src in enumerate(shipped):
        shutil.copy(src, folder / ("sub" if i % 3 == 0 else ".") / src.name)
    return folder


def _open(checkpoint: Path, gallery: Path):
    from lgur.model.checkpoint import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    return model, checkpoint_fingerprint(card)


def test_incremental_update_touches_only_changed_files(tiny_checkpoint: Path, gallery: Path) -> None:
    model, fp = _open(tiny_checkpoint, gallery)
    index, report = update_index(model, fp, gallery)
    assert len(index) == 8 and report.embedded == 8 and len(report.added) == 8
    before = {e.path: index.embeddings[i].copy() for i, e in enumerate(index.entries)}

    files = sorted(p for p in gallery.rglob("*.jpg"))
    changed, removed = files[1], files[2]
    shutil.copy(files[3], changed)  # new bytes under an old name
    removed.unlink()
    added = gallery / "new.jpg"
    shutil.copy(files[4], added)
    index, report = update_index(model, fp, gallery)
    rel = lambda p: p.relative_to(gallery).as_posix()  # noqa: E731
    assert report.changed == [rel(changed)] and report.added == [rel(added)] and report.removed == [rel(removed)]
    assert report.embedded == 2 and report.unchanged == 6
    for i, e in enumerate(index.entries):  # untouched rows are carried over as they were
        if e.path in before and e.path != rel(changed):
            assert np.array_equal(index.embeddings[i], before[e.path])
    _, report = update_index(model, fp, gallery)
    assert report.embedded == 0 and report.unchanged == 8
    os.utime(files[0], ns=(1, 1))  # touched, same bytes: re-hashed, not re-embedded
    _, report = update_index(model, fp, gallery)
    assert report.embedded == 0


def test_truncated_index_is_rebuilt_not_served(tiny_checkpoint: Path, gallery: Path) -> None:
    model, fp = _open(tiny_checkpoint, gallery)
    index, _ = update_index(model, fp, gallery)
    data = index_file(gallery / ".lgur-index")
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) - 100])  # cut short
    with pytest.raises(Exception, match="unreadable"):
        load_index(gallery, gallery / ".lgur-index", fp)
    rebuilt, report = update_index(model, fp, gallery)
    assert "unreadable" in report.rebuilt_because and report.embedded == 8
    assert np.allclose(rebuilt.embeddings, index.embeddings, atol=1e-6)
    flipped = bytearray(data.read_bytes())
    flipped[-5] ^= 0xFF  # one bit pattern changed inside the arrays
    data.write_bytes(bytes(flipped))
    _, report = update_index(model, fp, gallery)
    assert "checksum" in report.rebuilt_because and report.embedded == 8
    data.write_text("{broken")
    _, report = update_index(model, fp, gallery)
    assert "unreadable" in report.rebuilt_because and report.embedded == 8


def test_interrupted_writes_are_cleaned_and_updates_are_serialised(tiny_checkpoint: Path, gallery: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model, fp = _open(tiny_checkpoint, gallery)
    update_index(model, fp, gallery)
    leftover = gallery / ".lgur-index" / ".index.safetensors.x1y2.tmp"  # a writer killed mid-save
    leftover.write_bytes(b"half an index")
    extra = sorted(gallery.rglob("*.jpg"))
    for i in range(4):  # new files, then four updates at once: each must see a consistent index
        shutil.copy(extra[i], gallery / f"new-{i}.jpg")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: update_index(model, fp, gallery), range(4)))
    assert not leftover.exists()
    assert sum(report.embedded for _, report in results) == 4  # each new file embedded once, by one update
    assert all(len(index) == 12 for index, _ in results)
    assert len(load_index(gallery, gallery / ".lgur-index", fp)) == 12


def test_changed_checkpoint_rebuilds(tiny_checkpoint: Path, gallery: Path, tmp_path: Path) -> None:
    model, fp = _open(tiny_checkpoint, gallery)
    update_index(model, fp, gallery)
    torch.manual_seed(2)
    other = save_checkpoint(LGUR(tiny_config()).eval(), tmp_path / "other.safetensors")
    model2, fp2 = _open(other, gallery)
    assert fp2 != fp
    index, report = update_index(model2, fp2, gallery)
    assert "different checkpoint" in report.rebuilt_because and report.embedded == 8
    assert index.checkpoint == fp2


def test_unreadable_images_are_reported_and_skipped(tiny_checkpoint: Path, gallery: Path) -> None:
    good = sorted(gallery.rglob("*.jpg"))[0].read_bytes()
    (gallery / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (gallery / "empty.jpg").write_bytes(b"")
    (gallery / "text.png").write_text("not an image at all")
    Image.new("RGB", (32, 64)).save(gallery / "tiff.png", format="TIFF")
    model, fp = _open(tiny_checkpoint, gallery)
    index, report = update_index(model, fp, gallery)
    reasons = {r["path"]: r["reason"] for r in report.rejected}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.png"] == "not a JPEG, PNG, WebP, BMP or GIF image"
    assert reasons["tiff.png"] == "not a JPEG, PNG, WebP, BMP or GIF image"  # the bytes decide, not the name
    assert reasons["truncated.jpg"].startswith("corrupt image")
    assert len(index) == 8
    assert {r["path"] for r in load_index(gallery, gallery / ".lgur-index", fp).rejected} == set(reasons)


def test_indexing_reads_the_pixels_search_reads_from_one_decode(tmp_path: Path) -> None:
    """read_checked_image (indexing: check and read from one decode) == check_image + read_image."""
    rng = np.random.default_rng(0)
    files = {
        "photo.jpg": Image.fromarray(rng.integers(0, 255, (300, 120, 3), dtype=np.uint8)),
        "alpha.png": Image.fromarray(rng.integers(0, 255, (90, 40, 4), dtype=np.uint8)),
        "grey16.png": Image.fromarray(rng.integers(0, 4000, (90, 40), dtype=np.uint16)),
        "camera.jpg": Image.fromarray(rng.integers(0, 255, (1400, 1200, 3), dtype=np.uint8)),  # decoded at 1/2
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        pixels, problem = read_checked_image(tmp_path / name, (96, 32))
        assert problem is None and np.array_equal(pixels, read_image(tmp_path / name, (96, 32))), name
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "photo.jpg").read_bytes()[:500])
    pixels, problem = read_checked_image(tmp_path / "cut.jpg", (96, 32))
    assert pixels is None and problem.startswith("corrupt image")


def test_shards_merge_to_the_single_index(tiny_checkpoint: Path, gallery: Path, tmp_path: Path) -> None:
    model, fp = _open(tiny_checkpoint, gallery)
    single, _ = update_index(model, fp, gallery, tmp_path / "single")
    files = scan_gallery(gallery)
    shards = [update_index(model, fp, gallery, tmp_path / f"shard{r}", files=files[r::2])[0] for r in range(2)]
    assert len(shards[0]) + len(shards[1]) == len(single)
    merged = merge_shards(shards, gallery)
    assert [e.path for e in merged.entries] == [e.path for e in single.entries]
    for key in single.arrays:
        assert np.allclose(merged.arrays[key].astype(np.float32), single.arrays[key].astype(np.float32), atol=1e-3)


@pytest.mark.slow
def test_torchrun_index_two_shards(tiny_checkpoint: Path, gallery: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "lgur",
        "index",
        str(gallery),
        "--checkpoint",
        str(tiny_checkpoint),
        "--index-dir",
        str(tmp_path / "idx"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    merged = load_index(gallery.resolve(), tmp_path / "idx", checkpoint_fingerprint(read_card(tiny_checkpoint)))
    assert len(merged) == 8


def test_search_engine_explains_and_caches(tiny_checkpoint: Path, gallery: Path) -> None:
    engine, _ = SearchEngine.open(tiny_checkpoint, gallery)
    response = engine.search("a man in a blue jacket with a black backpack", k=5)
    assert len(response.results) == 5
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    for r in response.results:
        assert np.isclose(r.part_contribution.sum(), r.score, atol=2e-3)  # parts add up to the score
        assert Path(r.path).is_file()
        assert r.prototype_attention.shape[-1] == engine.grid[0] * engine.grid[1]
    assert response.query.words[:3] == ["a", "man", "in"]
    assert response.query.word_attention.shape[-1] == len(response.query.words)
    again = engine.encode_query("  a man in a blue   jacket with a black backpack ")
    assert again is response.query  # normalised text hits the cache
    with pytest.raises(QueryError):
        engine.search("   \n\t ", k=5)
    guidance = engine.guidance(response.query, response.results[0].path)
    assert guidance.shape == (engine.grid[0] * engine.grid[1], len(response.query.words))
    # Weighted by the foreground only where the model learns it (this one does not: no foreground prior).
    assert not engine.model.learns_foreground
    ids = torch.from_numpy(response.query.token_ids)[None]
    with torch.no_grad():
        plain = engine.model.guidance_attention(
            engine._images([response.results[0].path]), ids, torch.ones_like(ids, dtype=torch.bool)
        )
    expected = plain[0].mean(0).numpy()
    expected = np.stack([expected[:, span].sum(-1) for span in response.query.spans], -1)
    assert np.allclose(guidance, expected, atol=1e-6)


def test_atoms_are_ranked_relative_to_the_average_when_the_card_has_it(tiny_checkpoint: Path, gallery: Path) -> None:
    from lgur.search.atoms import caption_atom_histograms, relative_weights, shared_atoms, text_atom_average

    engine, _ = SearchEngine.open(tiny_checkpoint, gallery)
    text = "a man in a blue jacket with a black backpack"
    assert not engine.relative_atoms  # the tiny card has no average: raw weights on both sides
    raw = engine.search(text, k=3)
    assert np.array_equal(raw.results[0].atom_weights, raw.results[0].atom_histogram.astype(np.float32))
    # a caption's histogram is computed as a query's (mean over its words)
    np.testing.assert_allclose(caption_atom_histograms(engine.model, [text])[0], raw.query.atom_histogram, atol=1e-5)

    engine.text_atom_average = np.asarray(text_atom_average(engine.model, [text, "a woman in a red coat"])["text"])
    engine.clear_cache()
    response = engine.search(text, k=3)
    gallery_average = engine.index.arrays["atom_histogram"].astype(np.float32).mean(0)
    np.testing.assert_allclose(response.query.atom_weights, response.query.atom_histogram / engine.text_atom_average)
    for r in response.results:
        np.testing.assert_allclose(r.atom_weights, r.atom_histogram.astype(np.float32) / gallery_average, rtol=1e-5)
        assert r.shared_atoms == shared_atoms(response.query.atom_weights, r.atom_weights)
    assert np.array_equal(relative_weights(np.ones(3), None), np.ones(3))


def test_queries_outside_the_training_vocabulary_are_flagged(tiny_checkpoint: Path, gallery: Path) -> None:
    engine, _ = SearchEngine.open(tiny_checkpoint, gallery)
    assert engine.search("x" * 100 + " 🎒🎒", k=3).warning is None  # no vocabulary recorded: no claim made
    engine.vocabulary = frozenset("a man in red coat with black backpack".split())
    assert engine.search("a man in a red coat", k=3).warning is None
    nonsense = engine.search("x" * 10_000 + " 🎒🎒", k=3)
    assert nonsense.known_words == 0 and "ranking is a guess" in nonsense.warning
    assert "ranking is a guess" in nonsense.to_json()["warning"]
    partly = engine.search("a man in a crimson anorak", k=3)
    assert partly.unknown_words == ["crimson", "anorak"] and "crimson, anorak" in partly.warning


def test_search_equals_brute_force_on_the_shipped_gallery(tmp_path: Path) -> None:
    if not SHIPPED_CHECKPOINT.is_file():
        pytest.fail("the shipped checkpoint assets/lgur_cpu.safetensors is missing")
    engine, report = SearchEngine.open(SHIPPED_CHECKPOINT, REPO / "gallery", tmp_path / "index")
    assert len(engine.index) == len(list((REPO / "gallery" / "images").glob("*.jpg"))) and not report.rejected
    gallery = engine.index.embeddings.astype(np.float64)
    lift = engine.index.arrays["detail_lift"].astype(np.float64)  # the shipped model has a detail detector
    for query in ["a woman in a red coat with a black backpack", "man, grey shirt, blue jeans", "old man with a cap"]:
        top = engine.search_ids(query, 10)
        details = engine.parse_query(query).details
        brute = gallery @ engine.embed_query(query).astype(np.float64) + lift @ details.astype(np.float64)
        order = np.argsort(-brute, kind="stable")[:10]
        assert [f for f, _ in top] == [engine.index.entries[i].path for i in order]
        assert np.allclose([s for _, s in top], brute[order], atol=1e-4)
    # The index holds what the model computes for those files.
    from lgur.data.dataset import normalize

    rows = [0, len(engine.index) // 2]
    size = engine.model.config.image.img_size
    images = np.stack([read_image(engine.index.gallery / engine.index.entries[r].path, size) for r in rows])
    with torch.inference_mode():
        fresh = engine.model.embed_images(normalize(torch.from_numpy(images))).numpy()
    assert np.allclose(fresh, engine.index.embeddings[rows], atol=1e-5)


def test_large_galleries_switch_to_an_approximate_index_with_measured_recall(monkeypatch) -> None:
    import lgur.search.index as index_module
    from lgur.search.index import GalleryIndex

    monkeypatch.setattr(index_module, "EXACT_LIMIT", 1000)
    rng = np.random.default_rng(0)  # clustered, as embeddings of people are
    centres = rng.standard_normal((60, 64), dtype=np.float32)
    x = centres[rng.integers(0, 60, 6000)] + 0.3 * rng.standard_normal((6000, 64), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    big = GalleryIndex(Path("."), [], {"embeddings": x}, "fp")
    big.build_faiss()
    assert big.kind == "ivf" and len(big) == 6000
    assert 0.8 <= big.approximate_recall_at_10 <= 1.0
    scores, rows = big.search(x[:3], 10)
    assert rows.shape == (3, 10) and (rows[:, 0] == np.arange(3)).all()  # each vector finds itself
    small = GalleryIndex(Path("."), [], {"embeddings": x[:500]}, "fp")
    small.build_faiss()
    assert small.kind == "flat" and small.approximate_recall_at_10 is None


def test_word_effects_equal_scores_with_each_word_left_out(tiny_checkpoint: Path, gallery: Path) -> None:
    from lgur.search.engine import word_effects

    engine, _ = SearchEngine.open(tiny_checkpoint, gallery)
    response = engine.search("a man in a red coat", k=3)
    result = response.results[0]
    effects = word_effects(engine.model, response.query, result.parts)
    assert len(effects) == len(response.query.words) == 6
    # "a" and "in" describe nothing and are not scored; the describing words are
    assert [w for w, e in zip(response.query.words, effects) if np.isnan(e)] == ["a", "in", "a"]
    image = result.parts.astype(np.float32).reshape(-1)
    image /= np.linalg.norm(image)
    for i, word in enumerate(response.query.words):  # one query at a time, by hand
        if word in ("a", "in"):
            continue
        words = response.query.words[:i] + response.query.words[i + 1 :]
        ids, mask = engine.model.tokenize([" ".join(words)])
        without = float(engine.model.embed_texts(ids, mask)[0].detach().numpy() @ image)
        ids, mask = engine.model.tokenize([response.query.text])
        whole = float(engine.model.embed_texts(ids, mask)[0].detach().numpy() @ image)
        assert effects[i] == pytest.approx(whole - without, abs=1e-4), word
    assert whole == pytest.approx(result.score, abs=2e-3)  # the stored float16 parts give the search's score


def test_why_not_ranks_an_image_against_the_whole_gallery(tiny_checkpoint: Path, gallery: Path) -> None:
    engine, _ = SearchEngine.open(tiny_checkpoint, gallery)
    query = "a man in a blue jacket"
    scores = engine.index.embeddings.astype(np.float64) @ engine.encode_query(query).embedding.astype(np.float64)
    order = np.argsort(-scores)
    for position in (0, 3, len(order) - 1):
        file = engine.index.entries[order[position]].path
        comparison = engine.compare(query, file)
        assert comparison.image.file == file and comparison.image.rank == position + 1
        assert comparison.top.file == engine.index.entries[order[0]].path and comparison.top.rank == 1
        gap = comparison.image.part_contribution - comparison.top.part_contribution
        assert comparison.loses_most == int(np.argmin(gap))
        assert set(comparison.atoms_it_lacks).isdisjoint(comparison.image.shared_atoms)
    assert engine.compare(query, engine.index.entries[order[0]].path).loses_most in range(6)
    for bad in ("nope.jpg", "../secret.jpg", None, 3):
        with pytest.raises(QueryError):
            engine.compare(query, bad)


def test_search_by_photo_ranks_the_gallery_by_image_similarity(tiny_checkpoint: Path, gallery: Path) -> None:
    engine, _ = SearchEngine.open(tiny_checkpoint, gallery)
    file = engine.files()[2]
    response = engine.search_by_photo(engine.gallery / file, k=5)
    row = engine.index.row(file)
    np.testing.assert_allclose(response.query.embedding, engine.index.embeddings[row].astype(np.float32), atol=2e-3)
    scores = engine.index.embeddings.astype(np.float64) @ response.query.embedding.astype(np.float64)
    expected = [engine.index.entries[i].path for i in np.argsort(-scores) if i != row][:5]
    assert [r.file for r in response.results] == expected  # itself left out
    assert response.query.prototype_attention.shape[-1] == engine.grid[0] * engine.grid[1]
    kept = engine.search_by_photo(engine.gallery / file, k=3, exclude_self=False)
    assert kept.results[0].file == file
