"""Screenshot of the Space for the README: the text tab after scoring a paragraph with the
embedded model, taken in Debian's chromium through playwright.

    .venv/bin/python scripts/screenshot.py [assets/app.png]
"""

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
PARAGRAPH = (
    "The lighthouse stood at the end of a narrow spit of land, where the river met the sea. "
    "For more than a century its keepers climbed the spiral stairs each evening to light the lamp, "
    "and ships returning from the north used its beam to find the channel between the sandbanks. "
    "When the light was automated in 1987, the last keeper moved to the village and opened a small "
    "museum in the old customs house."
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out=ROOT / "assets" / "app.png"):
    from playwright.sync_api import sync_playwright

    import app

    demo = app.build_demo()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("textbox").first.fill(PARAGRAPH)
            page.get_by_role("button", name="Compute", exact=True).click()
            page.locator("#text-summary h3").wait_for(timeout=120_000)
            page.wait_for_timeout(1500)  # let the plot finish drawing
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            print(page.locator("#text-summary h3").inner_text(), "->", out)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
