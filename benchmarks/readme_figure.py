"""The README's figure: four charts of a ``plasticity report --compare`` page, screenshotted in headless Chromium
(Playwright) and tiled 2×2 into one palette PNG. The measure charts show one layer (``LAYER``, default hidden.1.act),
hidden the way a reader would, through the page's own Plotly legend state.

    python benchmarks/plasticity_loss.py --tasks 50 --seeds 3 --variants bp cbp redo shrink_perturb l2_init
    python benchmarks/readme_figure.py runs/plasticity_loss/comparison/report.html \
        docs/images/plasticity_loss_comparison.png

Needs Chromium (Debian: ``apt-get install chromium``) or ``CHROMIUM=/path/to/chrome``.
"""

import io
import os
import sys

from PIL import Image
from playwright.sync_api import sync_playwright

path, out = sys.argv[1], sys.argv[2]
layer = os.environ.get(
    "LAYER", "hidden.1.act"
)  # measure charts show this layer only (legend toggles, as a reader would)
charts = sys.argv[3:] or [
    "chart-accuracy-new-task",
    "chart-measure-effective-rank",
    "chart-measure-low-activity-fraction",
    "chart-measure-redo-dormant-fraction",
]
with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto("file://" + os.path.abspath(path))
    page.wait_for_function("document.body.dataset.rendered !== undefined")
    page.add_style_tag(content="nav { position: static !important; }")  # the sticky nav would cover a card's title
    shots = []
    for chart in charts:
        page.evaluate(
            """([id, layer]) => { const d = document.getElementById(id);
                 const hide = d.data.map((t, i) => [t.legendgroup || t.name || "", i])
                   .filter(([g]) => g.includes(" · ") && !g.includes(layer)).map(([, i]) => i);
                 if (hide.length) Plotly.restyle(d, {visible: false}, hide); }""",
            [chart, layer],
        )
        element = page.locator(f"#{chart}").locator("xpath=..")  # the chart's card, title included
        element.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        shots.append(Image.open(io.BytesIO(element.screenshot())).convert("RGB"))
    print("requests:", [r for r in requests if not r.startswith("file://")], "errors:", errors)
    browser.close()
w = max(s.width for s in shots)
h = max(s.height for s in shots)
sheet = Image.new("RGB", (2 * w, 2 * h), "white")
for i, s in enumerate(shots):
    sheet.paste(s, ((i % 2) * w, (i // 2) * h))
sheet = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
sheet.save(out, optimize=True)
print(out, os.path.getsize(out) // 1024, "KB", sheet.size)
