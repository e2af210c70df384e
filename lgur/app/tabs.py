"""The explorer's other tabs, each one idea over plain values (no Gradio here): search by
photo, the gallery (browsing and a visitor's uploads), and the model (card, tables, atom atlas)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..files import MAX_FILE_BYTES, check_image
from ..search.domain import UNLIKE_NOTE
from ..search.engine import PhotoResponse, SearchEngine
from ..search.explain import display_rgb, overlay, photo_maps, prototype_overlays, reading_name
from ..search.gallery import add_images, gallery_page
from ..search.query import QueryError, result_count
from .card import card_table
from .uploads import UploadStore

PER_PAGE = 120  # gallery tab
GALLERY_ROUTE = "/gallery"  # GET /gallery/<file>: a gallery image by the name /search answers with


class PhotoSearch:
    """A gallery image or an uploaded photo as the query: image-to-image retrieval on the same index."""

    def __init__(self, engine: SearchEngine, store: UploadStore, prototypes: list[str]) -> None:
        self.engine, self.store, self.prototypes = engine, store, prototypes

    def search(
        self, file: str | None, upload: str | None, k: float = 10, address: str = "local", root: str = ""
    ) -> tuple[list[tuple[str, str]], str, PhotoResponse | None, list[tuple[Any, str]]]:
        """A gallery image (by name) or an uploaded photo (sent from `address`) as the query: results, a
        status line, the response (kept per session) and the query photo's own prototype maps; uploads
        among the results shown by their URL under the page's `root`."""
        if upload:
            with self.store.holding([Path(upload)], address):  # read while answering, then deleted: not kept
                problem = check_image(Path(upload))
                if problem:
                    return [], f"⚠️ The photo cannot be used: {html.escape(problem)}.", None, []
                return self._answer(Path(upload), k, root)
        image = self.engine.image_path(file) if file else None
        if image is None:
            return [], "Pick a gallery image, or upload a photo of a person.", None, []
        return self._answer(image, k, root)

    def _answer(
        self, image: Path, k: float, root: str = ""
    ) -> tuple[list[tuple[str, str]], str, PhotoResponse | None, list[tuple[Any, str]]]:
        try:
            response = self.engine.search_by_photo(image, result_count(k))
        except QueryError as error:
            return [], f"⚠️ {html.escape(str(error))}", None, []
        items = [(self.store.shown(r.path, root), f"#{r.rank} · {r.score:.2f}") for r in response.results]
        status = (
            f"{len(items)} people who look alike, in {1000 * response.seconds:.0f} ms (the photo itself left out). "
            "Select one: its prototype maps appear beside the photo's; the same prototype reads the same body part "
            "in both."
        )
        if response.unlike_training:
            status = f"⚠️ {UNLIKE_NOTE[0].upper()}{UNLIKE_NOTE[1:]}.\n\n{status}"
        names = [reading_name(p, r) for p, r in enumerate(self.engine.prototype_readings(response.query))]
        return items, status, response, photo_maps(response.query, response.prototype_grid, names)

    def result_maps(self, response: PhotoResponse | None, selected: int) -> list[tuple[Any, str]]:
        """A photo search result's prototype maps, captioned with each part's share of the score."""
        if response is None or not response.results:
            return []
        result = response.results[min(max(int(selected), 0), len(response.results) - 1)]
        names = [reading_name(p, r) for p, r in enumerate(self.engine.prototype_readings(result))]
        return prototype_overlays(result, response.prototype_grid, names=names)

    def api_search(self, photo: str | dict, k: float = 10, address: str = "local") -> dict[str, Any]:
        """The /search_by_photo endpoint: a gallery image (by name) or a photo the client uploaded from
        `address` (a FileData dict, as gradio_client's handle_file sends it) as the query; JSON as /search.
        An upload is checked as the page's is, and deleted once answered."""
        if isinstance(photo, dict):
            sent = self.store.sent(str(photo.get("path") or ""), address)
            if sent is None:
                return {"error": "Upload the photo with this request (gradio_client's handle_file).", "results": []}
            with self.store.holding([sent], address):
                problem = check_image(sent)
                if problem:
                    return {"error": f"The photo cannot be used: {problem}.", "results": []}
                return self._api_answer(sent, k)
        image = self.engine.image_path(photo) if isinstance(photo, str) else None
        if image is None:
            return {
                "error": "Name an image of the gallery (as /search answers with), or upload a photo.",
                "results": [],
            }
        return self._api_answer(image, k)

    def _api_answer(self, image: Path, k: float) -> dict[str, Any]:
        try:
            body = self.engine.search_by_photo(image, result_count(k)).to_json()
        except QueryError as error:
            return {"error": str(error), "results": []}
        for result in body["results"]:
            result["url"] = f"{GALLERY_ROUTE}/{quote(result['file'])}"
        return body


class GalleryTab:
    """Browsing the gallery, and adding to it: a visitor's private uploads (in `store`), or with
    `shared_uploads` the shared gallery's `uploads` folder (local use)."""

    def __init__(self, engine: SearchEngine, store: UploadStore, shared_uploads: bool, uploads: str) -> None:
        self.engine, self.store, self.shared_uploads, self.uploads = engine, store, shared_uploads, uploads

    def browse(
        self, page: float = 1, visitor: str | None = None, per_page: int = PER_PAGE, root: str = ""
    ) -> tuple[list[tuple[str, str]], str]:
        """One page of the gallery, uploads first (the visitor's own, then shared ones): (image file,
        name) items and a line saying where we are; the visitor's uploads by their URL under `root`."""
        private = self.store.gallery(visitor)
        mine = [private.images / f for f in private.files()] if private else []
        files, where = gallery_page(self.engine.files(), self.engine.gallery, mine, page, per_page, self.uploads)
        return [(self.store.shown(f, root), f.name) for f in files], where

    def upload(
        self, files: list[Any] | None, visitor: str = "local", address: str = "local", root: str = ""
    ) -> tuple[str, list[tuple[str, str]]]:
        """Add uploaded files (sent from `address`; validated, indexed at once) to the visitor's private
        gallery, or to the shared one with `shared_uploads`; report what was refused. -> report, first
        gallery page."""
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "No files were given.", self.browse(1, visitor, root=root)[0]
        if self.shared_uploads:
            with self.store.holding(paths, address):
                report = add_images(self.engine, paths, self.uploads)
        else:
            report = self.store.add(self.engine, visitor, paths, address)
        whose = "the gallery now holds" if self.shared_uploads else "only you see them; your search covers"
        lines = [f"Added {len(report.added)} image(s); {whose} {report.gallery_size}."]
        lines += [f"- rejected `{html.escape(name)}`: {html.escape(reason)}" for name, reason in report.rejected]
        return "\n".join(lines), self.browse(1, visitor, root=root)[0]

    def own_files(self, visitor: str | None) -> list[str]:
        """The names of the visitor's own uploads, as the page lists them."""
        private = self.store.gallery(visitor)
        return private.files() if private else []

    def remove(
        self, names: list[str] | None, visitor: str | None = None, root: str = "", everything: bool = False
    ) -> tuple[str, list[tuple[str, str]], str, list[str]]:
        """Delete the visitor's uploads `names` (not theirs: ignored), or all of them: a report, the first
        page, where it is, and the uploads left."""
        wanted = self.own_files(visitor) if everything else [n for n in (names or []) if isinstance(n, str)]
        gone = self.store.remove(self.engine, visitor, wanted) if wanted else []
        if not wanted:
            report = "Pick the uploads to delete."
        elif gone:
            report = f"Deleted {len(gone)} upload(s): gone from the gallery, the search and the server."
        else:
            report = "None of those is one of your uploads."
        items, where = self.browse(1, visitor, root=root)
        return report, items, where, self.own_files(visitor)

    def leave(self, visitor: str | None) -> None:
        """The visitor closed the page: their uploads are deleted now."""
        self.store.discard(visitor)

    def upload_help(self) -> str:
        """What the Gallery tab says about uploads: kinds, size, and who sees them for how long."""
        whose = (
            "they join the gallery for everyone"
            if self.shared_uploads
            else "only you see them, they are searched with the gallery and deleted when you close the page "
            f"(or {self.store.limits.lifetime / 60:.0f} minutes after your last search or upload)"
        )
        return (
            f"Browse the gallery, or add images (JPEG/PNG/WebP/BMP/GIF, up to {MAX_FILE_BYTES // 2**20} MB each): "
            f"they are indexed at once; {whose}."
        )


class ModelTab:
    """The model card, the measured tables that ship with it, and the atlas of each dictionary atom."""

    def __init__(self, engine: SearchEngine, prototypes: list[str]) -> None:
        self.engine, self.prototypes = engine, prototypes

    def card_table(self) -> str:
        return card_table(self.engine.card, self.prototypes)

    @property
    def atom_label(self) -> str:
        """The atlas's number box: its range is said, not enforced (atom_atlas answers a number outside it)."""
        return f"atom (0 to {self.engine.model.config.num_atoms - 1})"

    @staticmethod
    def measured_tables(assets: Path) -> list[str]:
        """The ablation and experiments tables that ship in `assets` (each file says how it was measured)."""
        titles = {
            "ablation.md": "Ablation",
            "ablation_lite0.md": "Ablation with the pretrained trunk",
            "experiments.md": "The recipe's options, one at a time",
            "trunk.md": "The pretrained trunk's settings, one at a time",
        }
        return [
            f"### {title} (synthetic world)\n\n{(assets / name).read_text()}"
            for name, title in titles.items()
            if (assets / name).is_file()
        ]

    def atom_atlas(self, atom: float) -> tuple[list[tuple[Any, str]], str]:
        """For one atom: the gallery patches and the vocabulary words that use it most."""
        try:
            number = int(atom)
        except (TypeError, ValueError, OverflowError):
            return [], "Pick an atom by its number."
        try:
            atlas = self.engine.atlas.atom(number)
        except ValueError as error:  # no dictionary, or no such atom
            return [], html.escape(str(error))
        items = [
            (overlay(display_rgb(path), weights, self.engine.grid), f"{path.name} ({weights.max():.3f})")
            for path, weights in atlas.images
        ]
        words = ", ".join(f"{html.escape(w)} ({v:.1f}x)" for w, v in atlas.words)
        return items, (
            f"**Atom {atlas.atom}** stands for the words that use it most, against the average word's "
            f"use: {words or 'none (no gallery captions)'}"
        )
