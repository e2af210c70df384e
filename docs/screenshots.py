"""Retake the README's two screenshots from the app as a visitor sees it.

    python docs/screenshots.py [--checkpoint assets/lgur_cpu.safetensors] [--out assets]

Starts `python app.py` on the shipped gallery, types the query in Debian's chromium (headless,
through playwright: requirements-dev.txt), selects the first result and waits for every panel,
then writes `screenshot_search.png` (the top of the page) and `screenshot_explain.png` (the
explanation of result #1). Run it from the repository root after shipping a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUERY = "a man with a black backpack and white sneakers"
CHROMIUM = "/usr/bin/chromium"
WIDTH = 1400


def take(url: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless=new", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": WIDTH, "height": 3000})
        page.goto(url)
        page.locator("#query textarea").fill(QUERY)
        page.locator("#query textarea").press("Enter")
        expect(page.locator("#results img").first).to_be_visible(timeout=60_000)
        expect(page.locator("#summary")).to_contain_text("Result #1", timeout=60_000)
        expect(page.locator("#guidance img")).to_be_visible(timeout=60_000)  # the page's second step drawn
        expect(page.locator("#chart-atom-patches img").first).to_be_visible(timeout=60_000)
        page.wait_for_function("!document.querySelector('.progress-text, .eta-bar')", timeout=60_000)
        page.mouse.move(0, 0)  # no hover highlight in the picture
        page.wait_for_timeout(1000)  # images decoded, transitions over
        page.screenshot(path=str(out / "screenshot_search.png"), clip={"x": 0, "y": 0, "width": WIDTH, "height": 1000})
        top = page.locator("#summary").bounding_box()["y"] - 70  # the prototype dropdowns' lower edge in view
        page.screenshot(
            path=str(out / "screenshot_explain.png"),
            clip={"x": 0, "y": top, "width": WIDTH, "height": 1800},
            full_page=True,
        )
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="assets/lgur_cpu.safetensors")
    parser.add_argument("--gallery", default="gallery")
    parser.add_argument("--out", type=Path, default=Path("assets"))
    parser.add_argument("--port", type=int, default=7897)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the repository's lgur, as app.py imports it
    from lgur.eval.bench import start_app

    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    proc, url, _ = start_app(ROOT / "app.py", args.checkpoint, args.gallery, args.port)
    try:
        take(url, args.out)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out / 'screenshot_search.png'} and {args.out / 'screenshot_explain.png'}")


if __name__ == "__main__":
    main()
