"""The interactive lab in a real browser: notebook 02 in JupyterLab, in headless Chromium, driven by Playwright.

    bash scripts/setup_browser.sh                 # Chromium (apt-get) + the Playwright driver (pip)
    .venv/bin/python -m pytest -m browser -q      # 35-55 s on 2 shared cores

One test, one user session: JupyterLab starts on a free localhost port (with a token) over a temporary
copy of notebook 02; Chromium opens it, runs every cell from the Run menu (small configuration,
TWLAB_SMALL=1), then uses the mask explorer the way a learner does: types a node into the token slider's
readout and clicks the `causal` mask button. After each step the figure the browser drew is checked
against its own title: the title names the chosen node, "sees N tokens" equals the number of boxes drawn
in the "sees" colours, and under the causal mask "M leaked" equals the number of orange boxes (M > 0),
while the node's ancestors stay what the trie mask showed.

Design choices
- The browser is the system's Chromium (`apt-get install chromium`, or TWLAB_CHROMIUM), launched by
  Playwright with `executable_path`; `playwright install` (a browser download) is never used. The flags
  that stop Chromium's background connections are needed on a closed network (without them its
  connections get refused), and every run gets a fresh profile.
- Missing Chromium or Playwright: skipped with the command that installs them; under CI=true a failure,
  since CI installs both (.ci/run -> scripts/setup_browser.sh) and a skip would hide that the tier did not run.
- The page may reach the local JupyterLab only: other requests are aborted (and logged), so the test
  runs the same with or without a network.
- JupyterLab runs with its settings, workspaces, runtime and config folders (and IPYTHONDIR) in the
  temporary folder: nothing the user set changes what the test sees, news and update checks are off, and
  the notebook is not windowed (every cell stays in the DOM). The committed notebook is never written.
- The explorer is found by the CSS classes `twlib.viz.mask_explorer` gives its widgets
  (`twlab-mask-explorer`, `twlab-token`, `twlab-mask-kind`), not by cell position, so the notebook can
  be reshaped freely. Box states are read from the plotly bars' fill colours (`twlib.viz.COLORS`).
- Every wait is on a DOM condition with a timeout, never a sleep. Screenshots of each step (and, on a
  failure, of the whole page, with the browser's console log and JupyterLab's log) go to
  $TWLAB_ARTIFACTS/browser or runs/browser-artifacts/; the test prints where.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import in_ci

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_trie_masking.ipynb"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETUP = "run `bash scripts/setup_browser.sh` (apt-get install chromium; pip install playwright)"
RUN_ALL_TIMEOUT_S = 240       # the notebook runs in ~15 s here (small configuration); CI machines are slower
STEP_TIMEOUT_MS = 30_000      # one widget change: the kernel redraws the figure, the browser renders it


def artifacts_dir() -> Path:
    base = os.environ.get("TWLAB_ARTIFACTS")
    folder = Path(base) / "browser" if base else ROOT / "runs" / "browser-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):    # only this run's files: a stale screenshot must not pass for a new one
        if old.is_file():
            old.unlink()
    return folder


def missing(message: str):
    if in_ci():
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def chromium() -> str:
    """The system Chromium's path, once Playwright is known to be there (checked before JupyterLab starts)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing(f"Playwright is not installed: {SETUP}")
    path = os.environ.get("TWLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).exists():
        missing(f"no Chromium (TWLAB_CHROMIUM, or `chromium` on PATH): {SETUP}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- JupyterLab on a temporary copy of notebook 02 ----------------------------------------------------


def write_settings(folder: Path) -> None:
    """User settings for this JupyterLab only: no news or update checks (network), no windowed notebook."""
    settings = {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    }
    for name, values in settings.items():
        path = folder / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with status {proc.returncode}; its log ({log}):\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)    # polling a server that is starting: there is no event to wait on
    pytest.fail(f"JupyterLab did not answer {url.split('?')[0]} within {timeout:.0f} s; its log ({log}):\n"
                f"{log.read_text()[-3000:]}")


@pytest.fixture
def jupyterlab(tmp_path):
    """(url of notebook 02 in JupyterLab, JupyterLab's log). The server and its kernels end with the test."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the `notebooks` extra)")
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    write_settings(tmp_path / "lab-settings")
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, TWLAB_SMALL="1", PYTHONUNBUFFERED="1",
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               IPYTHONDIR=str(tmp_path / "ipython"))
    env.setdefault("OMP_NUM_THREADS", "1")
    log = artifacts_dir() / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--ServerApp.port_retries=0", "--allow-root", "--LabApp.extension_manager=readonly"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)   # its own process group: the kernels end with it
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield f"{base}/lab/tree/{NOTEBOOK.name}?token={token}&reset", log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- the browser ----------------------------------------------------------------------------------------


@pytest.fixture
def page(chromium, tmp_path):
    """A Chromium page (fresh profile); its console messages, page errors and failed requests are kept on
    `page.console`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.console = []
            page.on("console", lambda m: page.console.append(f"[{m.type}] {m.text}"))
            page.on("pageerror", lambda e: page.console.append(f"[pageerror] {e}"))
            page.on("requestfailed", lambda r: page.console.append(f"[requestfailed] {r.url} {r.failure}"))
            # nothing but the local JupyterLab: a request elsewhere (plotly's notebook output names MathJax on
            # a CDN) is refused at once, instead of depending on how the machine's network treats it
            context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), lambda route: route.abort("blockedbyclient"))
            yield page
        finally:
            context.close()


# ---- reading the explorer's figure from the DOM -----------------------------------------------------------


def rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


EXPLORER = ".twlab-mask-explorer"
TITLE_JS = f"() => document.querySelector('{EXPLORER} .gtitle')?.textContent ?? ''"
# the fill of every token box (plotly draws a bar's box as a path with an inline style)
FILLS_JS = f"() => [...document.querySelectorAll('{EXPLORER} .barlayer .point path')].map(p => p.style.fill)"


def figure_state(page) -> dict:
    """The explorer's figure as drawn: its title, the chosen node, "sees N", "M leaked", and box counts."""
    from twlib.viz import COLORS

    title = page.evaluate(TITLE_JS)
    node = re.match(r"#(\d+) ", title)
    sees = re.search(r"sees (\d+) tokens", title)
    leaked = re.search(r", (\d+) leaked", title)
    fills = page.evaluate(FILLS_JS)
    # boxes per state: "chosen_boxes", "parent_boxes", "ancestor_boxes", "leaked_boxes", "hidden_boxes"
    count = {f"{state}_boxes": fills.count(rgb(COLORS[state]))
             for state in ("chosen", "parent", "ancestor", "leaked", "hidden")}
    assert node and sees, f"the explorer's title does not read '#node ... sees N tokens': {title!r}"
    return {"title": title, "node": int(node.group(1)), "sees": int(sees.group(1)),
            "leaked": int(leaked.group(1)) if leaked else None, "boxes": len(fills), **count,
            "kind": "causal" if "(causal mask)" in title else "trie" if "(trie mask)" in title else None}


def wait_for_title(page, pattern: str) -> None:
    """Wait until the explorer's title matches `pattern` (a JS regular expression) and its bars are drawn."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"""() => {{ const t = ({TITLE_JS})();
                         return new RegExp({json.dumps(pattern)}).test(t)
                                && document.querySelectorAll('{EXPLORER} .barlayer .point path').length > 0; }}""",
            timeout=STEP_TIMEOUT_MS, polling=100)
    except PlaywrightTimeout:
        pytest.fail(f"after {STEP_TIMEOUT_MS / 1000:.0f} s the explorer's title still does not match {pattern!r}: "
                    f"it reads {page.evaluate(TITLE_JS)!r}", pytrace=False)


# ---- the steps -------------------------------------------------------------------------------------------------


STATUS_JS = "() => document.querySelector('.jp-StatusBar-TextItem[title^=\"Change kernel\"]')?.textContent.trim() ?? ''"
PROMPTS_JS = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
# JupyterLab does not execute an empty code cell (an exercise's "try it here" cell): its prompt stays [ ]
EMPTY_JS = "() => [...document.querySelectorAll('.jp-CodeCell .cm-content')].map(e => e.textContent.trim() === '')"


def open_notebook(page, url: str) -> None:
    page.goto(url, timeout=60_000)
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=60_000)
    # the kernel has started and is idle ("Python 3 (ipykernel) | Idle" in the status bar)
    page.wait_for_function(f"() => /\\| Idle$/.test(({STATUS_JS})())", timeout=60_000, polling=250)


def run_all_cells(page) -> None:
    """Run > Run All Cells, then wait until no cell is queued or running ("[*]")."""
    page.locator(".lm-MenuBar-item", has_text="Run").click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    # every queued cell shows [*] at once; a cell that raises clears the queue (the rest show [ ])
    page.wait_for_function(f"""() => {{ const p = ({PROMPTS_JS})();
                                        return p.some(x => /\\d/.test(x)) && !p.some(x => x.includes('*')); }}""",
                           timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500)
    prompts, empty = page.evaluate(PROMPTS_JS), page.evaluate(EMPTY_JS)
    assert len(prompts) == len(empty), (len(prompts), len(empty))
    not_run = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p) and not empty[i]]
    if not_run:
        outputs = page.evaluate("""() => [...document.querySelectorAll('.jp-CodeCell')].map(
                                         c => c.querySelector('.jp-OutputArea')?.innerText ?? '')""")
        stopped = max(i for i, p in enumerate(prompts) if re.fullmatch(r"\[\d+\]:", p))
        pytest.fail(f"{NOTEBOOK.name}: code cells {not_run} did not run; code cell {stopped} (the last that "
                    f"ran) printed:\n{outputs[stopped][-3000:]}", pytrace=False)


def select_node(page, node: int) -> None:
    """Type `node` into the token slider's readout (what a learner does to pick an exact node)."""
    readout = page.locator(f"{EXPLORER} .twlab-token .widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(node))
    page.keyboard.press("Enter")


def seen_boxes(state: dict) -> int:
    """Boxes drawn as seen by the node and not leaked: itself, its parent, its other ancestors."""
    return state["chosen_boxes"] + state["parent_boxes"] + state["ancestor_boxes"]


def check_trie_view(state: dict) -> None:
    """Under the trie mask the node sees its ancestors and itself: boxes in the 'sees' colours = N."""
    assert state["kind"] == "trie" and state["leaked"] is None, state["title"]
    assert state["chosen_boxes"] == 1 and state["leaked_boxes"] == 0, state
    assert seen_boxes(state) == state["sees"], state
    assert state["boxes"] > state["sees"], state   # some of the row is hidden from it


def shoot(page, folder: Path, name: str, shots: list[Path]) -> None:
    path = folder / f"{len(shots) + 1:02d}-{name}.png"
    page.locator(EXPLORER).screenshot(path=str(path))
    shots.append(path)


def test_explorer_widgets_carry_the_classes_this_test_finds():
    """Headless (no browser needed): the CSS classes the browser test relies on are set on the widgets."""
    from twlib.format import DISTANCE_EXAMPLE, DISTANCE_PROMPT, engine_calls
    from twlib.tokenizer import build_tokenizer
    from twlib.trie import pack
    from twlib.viz import mask_explorer

    tok = build_tokenizer()
    explorer = mask_explorer({"distance example": pack(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), tok)}, tok)
    dropdown, slider, toggle = explorer.controls
    assert "twlab-mask-explorer" in explorer._dom_classes
    assert "twlab-token" in slider._dom_classes and "twlab-mask-kind" in toggle._dom_classes
    assert "twlab-sample" in dropdown._dom_classes
    assert list(toggle.options) == ["trie", "causal"]   # the button the test clicks is labelled `causal`


@pytest.mark.browser
@pytest.mark.slow
def test_mask_explorer_in_jupyterlab(chromium, jupyterlab, page):
    url, lab_log = jupyterlab
    folder = lab_log.parent
    shots: list[Path] = []
    began = time.perf_counter()
    try:
        open_notebook(page, url)
        shots.append(folder / "01-notebook-open.png")
        page.screenshot(path=str(shots[-1]))
        run_all_cells(page)
        ran = time.perf_counter() - began
        explorer = page.locator(EXPLORER)
        explorer.wait_for(timeout=STEP_TIMEOUT_MS)
        explorer.scroll_into_view_if_needed()
        wait_for_title(page, r"^#\d+ .*\(trie mask\)")
        first = figure_state(page)
        check_trie_view(first)
        shoot(page, folder, "explorer-after-run-all", shots)

        # select a node: the last of the row (a later branch, so a causal mask leaks earlier branches into it)
        last = int(float(page.locator(f"{EXPLORER} .twlab-token .noUi-handle").get_attribute("aria-valuemax")))
        assert last != first["node"], (f"the explorer already shows the row's last node #{last}: "
                                       "selecting it would change nothing")
        select_node(page, last)
        wait_for_title(page, rf"^#{last} .*\(trie mask\)")
        trie = figure_state(page)
        check_trie_view(trie)
        shoot(page, folder, f"node-{last}-trie-mask", shots)

        # turn the causal (leakage) view on
        page.locator(f"{EXPLORER} .twlab-mask-kind button", has_text="causal").click()
        wait_for_title(page, rf"^#{last} .*\(causal mask\).*sees \d+ tokens, \d+ leaked")
        causal = figure_state(page)
        shoot(page, folder, f"node-{last}-causal-mask", shots)
        assert causal["leaked"] > 0, f"a node on a later branch leaks nothing under the causal mask: {causal['title']}"
        assert causal["leaked"] == causal["leaked_boxes"], (
            f"the title says {causal['leaked']} leaked but {causal['leaked_boxes']} boxes are orange")
        # ancestors are unchanged: what the causal mask adds is exactly the orange boxes
        assert seen_boxes(causal) == trie["sees"], (causal, trie)
        assert causal["sees"] == trie["sees"] + causal["leaked"], (causal, trie)
        assert causal["boxes"] == trie["boxes"] == last + 1, "one box per node of the row"
        # a causal mask shows the row's last node every token before it: nothing is left hidden
        assert causal["sees"] == last + 1 and causal["hidden_boxes"] == 0, causal
        legend = page.evaluate(f"() => [...document.querySelectorAll('{EXPLORER} .legendtext')].map(e => e.textContent)")
        assert any("LEAKED" in t for t in legend), legend
        pageerrors = [m for m in page.console if m.startswith("[pageerror]")]
        assert not pageerrors, pageerrors
        print(f"\nbrowser tier: notebook ran in {ran:.1f} s (from opening), whole session "
              f"{time.perf_counter() - began:.1f} s; node #{last}: trie sees {trie['sees']}, causal sees "
              f"{causal['sees']} ({causal['leaked']} leaked, {causal['leaked_boxes']} orange boxes)")
        print("screenshots:", *[str(s) for s in shots], sep="\n  ")
    except BaseException:
        failure = folder / "failure-page.png"
        try:
            page.screenshot(path=str(failure), full_page=True)
        except Exception as e:  # the page may be gone; the logs still say what happened
            print(f"no failure screenshot: {e}")
        (folder / "console.log").write_text("\n".join(page.console) + "\n")
        print(f"browser tier failed: screenshot {failure}, console log {folder / 'console.log'}, "
              f"JupyterLab log {lab_log}, step screenshots {[s.name for s in shots]}")
        raise
    (folder / "console.log").write_text("\n".join(page.console) + "\n")
