"""How the web app copes with a large dictionary: features.db queries and the WebGL feature map.

Builds synthetic features.db files (random map positions, densities, explanations; no examples) for
a baseline of 1,000 features and for N features (default 100,000), serves each with the real app on
loopback, and measures per size:

- API: /api/map (first call builds the JSON, later ones are cached), a deep page of /api/features
  sorted by density, a cluster filter, a full-text search, and one feature's page;
- browser (Debian's chromium via Playwright, when present): /map until all points are drawn, then a
  zoom and a pan (Plotly.relayout on the scattergl trace), as wall time inside the page.

Prints each figure and its ratio to the 1,000-feature baseline of the same run.

    python benchmarks/web_map.py [--features 100000]
"""

from __future__ import annotations

import argparse
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

WORDS = "import def return self path file open read write string list dict error test assert call".split()


def build_db(path: Path, n: int, seed: int = 0) -> None:
    from saelab import featuredb

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = rng.randrange(40)
        rows.append({"id": i, "count": rng.randrange(1, 10_000), "density": 10 ** rng.uniform(-6, -1),
                     "max_act": rng.uniform(0.5, 20), "mean_act": rng.uniform(0.1, 5), "score": rng.random(),
                     "explanation": f"fires on `{rng.choice(WORDS)}` near `{rng.choice(WORDS)}`",
                     "x": rng.gauss(c % 8, 0.6), "y": rng.gauss(c // 8, 0.6), "cluster": c,
                     "top_tokens": " ".join(rng.sample(WORDS, 4))})
    with featuredb.build(path) as w:
        w.meta(model_name="synthetic", hook_name="blocks.0.hook_resid_post", d_sae=n, d_in=64)
        w.features(rows)


def timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` wall times of ``fn()`` in milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def api_figures(db: Path) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from saelab.web.app import create_app

    client = TestClient(create_app(db=db), base_url="http://127.0.0.1:8765")
    get = lambda url: client.get(url).raise_for_status()  # noqa: E731
    n = client.get("/api/features?limit=1").json()["total"]
    t0 = time.perf_counter()
    get("/api/map")
    first = (time.perf_counter() - t0) * 1e3
    return {"map JSON, first (ms)": first, "map JSON, cached (ms)": timed(lambda: get("/api/map")),
            "map JSON (MB)": len(client.get("/api/map").content) / 1e6,
            "deep page by density (ms)": timed(lambda: get(f"/api/features?order_by=density&offset={n // 2}")),
            "cluster filter (ms)": timed(lambda: get("/api/features?cluster=7&order_by=max_act")),
            "full-text search (ms)": timed(lambda: get("/api/features?q=assert")),
            "feature page (ms)": timed(lambda: get(f"/features/{n // 3}"))}


def browser_figures(db: Path, n: int) -> dict[str, float]:
    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(db=db, config=ServerConfig(port=port)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"]
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(f"http://127.0.0.1:{port}/static/plotly.min.js")  # warm the bundle into the cache
        t = time.perf_counter()
        page.goto(f"http://127.0.0.1:{port}/map")
        expect(page.locator("#map-status")).to_contain_text(f"{n} features", timeout=120_000)
        out["map load to drawn (ms)"] = (time.perf_counter() - t) * 1e3
        out["zoom (ms)"], out["pan (ms)"] = page.evaluate("""async () => {
            const gd = document.getElementById('map-plot');
            const [x0, x1] = gd._fullLayout.xaxis.range, [y0, y1] = gd._fullLayout.yaxis.range;
            let t = performance.now();
            await Plotly.relayout(gd, {'xaxis.range': [x0 + (x1 - x0) / 4, x1 - (x1 - x0) / 4],
                                       'yaxis.range': [y0 + (y1 - y0) / 4, y1 - (y1 - y0) / 4]});
            const zoom = performance.now() - t;
            t = performance.now();
            await Plotly.relayout(gd, {'xaxis.range': [x0, x0 + (x1 - x0) / 2]});
            return [zoom, performance.now() - t];
        }""")
        out["trace type"] = page.evaluate("document.getElementById('map-plot')._fullData[0].type")
        browser.close()
    server.should_exit = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in (1_000, args.features):
            db = Path(tmp) / f"features-{n}.db"
            t = time.perf_counter()
            build_db(db, n)
            print(f"built a {n:,}-feature features.db in {time.perf_counter() - t:.1f} s")
            results[n] = api_figures(db)
            if Path("/usr/bin/chromium").exists():
                results[n].update(browser_figures(db, n))
        base, big = results[1_000], results[args.features]
        print(f"\n{'':32} {'1,000':>10} {args.features:>10,} {'ratio':>7}")
        for key in big:
            a, b = base[key], big[key]
            if isinstance(b, str):
                print(f"{key:32} {a:>10} {b:>10}")
                continue
            print(f"{key:32} {a:>10.1f} {b:>10.1f} {b / a if a else float('nan'):>7.1f}")


if __name__ == "__main__":
    main()
