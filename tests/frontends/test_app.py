"""``python -m astsep.frontends.app``: the web demo, driven in a real headless Chromium, and its core without a page."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from astsep.audio import load_audio
from conftest import ESC, ROOT, mixture

pytest.importorskip("gradio", reason='the web demo needs Gradio: pip install -e ".[app]"')

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
START_TIMEOUT = 180  # s: importing gradio and torch on a busy 2-core machine
RUN_TIMEOUT = 240  # s: one short clip with the tiny model and its debug figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """The demo in its own process on a free local port, with its Gradio cache in a temp folder."""
    import requests

    cache = tmp_path_factory.mktemp("gradio_cache")
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    log = (cache.parent / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "astsep.frontends.app", "--model", str(tiny_model_dir), "--port", str(port),
                             "--max-passes", "2", "-v"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with {proc.returncode}: {(cache.parent / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the demo did not answer on {url} within {START_TIMEOUT} s")
        time.sleep(1)
    yield {"url": url, "cache": cache, "proc": proc, "log": cache.parent / "server.log"}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium browser and chromedriver on PATH (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # a fake microphone (a beep) that the page may use without asking
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2600",
              "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, what, timeout: float, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(what, message=message)


def _find(driver, root, css: str, timeout: float = 30):
    """``root.find_element(css)`` once the page has drawn it (Gradio renders in steps)."""
    from selenium.webdriver.common.by import By

    return _wait(driver, lambda d: root.find_element(By.CSS_SELECTOR, css), timeout, f"nothing matches {css!r}")


def _click(driver, root, css: str, timeout: float = 30) -> None:
    """Click ``css`` under ``root`` once it is drawn and nothing covers it (the page lays out in steps)."""
    from selenium.common.exceptions import (ElementClickInterceptedException, ElementNotInteractableException,
                                            NoSuchElementException)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def click(d):
        root.find_element(By.CSS_SELECTOR, css).click()
        return True

    WebDriverWait(driver, timeout, poll_frequency=0.5,
                  ignored_exceptions=(ElementClickInterceptedException, ElementNotInteractableException,
                                      NoSuchElementException)).until(click, message=f"cannot click {css!r}")


def _upload_and_separate(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"), 60,
                  "no file input in the upload box")
    field.send_keys(str(path))
    # the upload is done when the box shows the file's name (wrapped over lines)
    _wait(driver, lambda d: path.name in "".join(d.find_element(By.ID, "upload").text.split()), 60,
          f"{path.name} was not uploaded")
    _click(driver, driver, "#separate")


def _status(driver) -> str:
    """The page's own status line (Gradio's "processing" overlay is not it)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, "#status .astsep-done, #status .astsep-error")
    return found[0].text.strip() if found else ""


def _wait_done(driver) -> None:
    _wait(driver, lambda d: _status(d), RUN_TIMEOUT, "no result within the time allowed")


def _clock(seconds: float) -> str:
    """How the player writes a duration: m:ss."""
    return f"{int(seconds) // 60}:{int(round(seconds)) % 60:02d}"


def _fetch(url: str) -> bytes:
    import requests

    r = requests.get(url, timeout=30)
    assert r.status_code == 200, f"{url}: HTTP {r.status_code}"
    return r.content


@pytest.mark.slow
def test_web_page_separates_an_upload_plays_the_sources_and_serves_wav_and_zip(browser, server, tmp_path, shared):
    from selenium.webdriver.common.by import By

    driver = browser
    clip = next(ESC.glob("siren__*.flac"))
    driver.get(server["url"])
    _upload_and_separate(driver, clip)
    _wait_done(driver)
    assert "astsep: error" not in _status(driver), _status(driver)
    assert _status(driver).startswith(clip.name)

    # one player per output file, each with its label, category, confidence and time span
    players = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".astsep-source"), 30, "no source players")
    labels = [_find(driver, p, "[data-testid=block-label]").text for p in players]
    assert len(players) >= 2, labels  # at least one source and the residual
    for text in labels:
        assert "confidence" in text and " · " in text, text
    assert any(cat in " ".join(labels) for cat in ("danger", "help", "warning", "other"))

    # the browser decodes every source (the player shows the clip's length) and plays one
    expected = sf.info(str(clip)).duration
    for p in players:
        _wait(driver, lambda d, p=p: p.find_element(By.CSS_SELECTOR, "time#duration").text == _clock(expected), 30,
              "a player did not load its source")
    first = players[0]
    _click(driver, first, "button[aria-label=Play]")
    _wait(driver, lambda d: first.find_element(By.CSS_SELECTOR, "time#time").text != "0:00", 30,
          "the first source did not play")

    # every source downloads as the WAV the pipeline wrote (16 kHz, the clip's length)
    links = [_find(driver, p, "a[data-testid=download-link]") for p in players]
    for link in links:
        assert link.get_attribute("download").endswith(".wav")
        data, sr = sf.read(io.BytesIO(_fetch(link.get_attribute("href"))), dtype="float64")
        assert sr == 16000 and abs(len(data) / sr - expected) < 0.01

    # the zip holds every file and events.json, and the WAVs in it add up to the input
    zip_link = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#zip a[href]"), 30, "no zip download link")
    assert zip_link.get_attribute("download") == f"{clip.stem}_astsep.zip"
    zf = zipfile.ZipFile(io.BytesIO(_fetch(zip_link.get_attribute("href"))))
    manifest = json.loads(zf.read("events.json"))
    assert sorted(zf.namelist()) == sorted(manifest["files"] + ["events.json"])
    assert manifest["stats"]["input"] == clip.name  # the user's file name, not the server's temp path
    wavs = [n for n in zf.namelist() if n.endswith(".wav")]
    total = sum(sf.read(io.BytesIO(zf.read(n)), dtype="float64")[0] for n in wavs)
    assert len(wavs) == len(players)
    x16 = load_audio(clip)[0].double().numpy()  # the 16 kHz mono input the pipeline separated
    assert total.shape == x16.shape
    assert 10 * np.log10(np.sum(x16 ** 2) / np.sum((x16 - total) ** 2)) > 60  # float32 WAVs add back up

    # the events table and one debug figure per pass that ran
    grid = _find(driver, driver, "#events [role=grid]")
    assert int(grid.get_attribute("aria-rowcount")) == 1 + len(manifest["events"])  # header + one row per event
    assert manifest["events"][0]["label"] in driver.find_element(By.ID, "events").text
    figures = [n for n in manifest["files"] if n.startswith("debug_pass_")]
    assert figures
    thumbs = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#figures img"), 30, "no debug figures")
    assert len(thumbs) == len(figures)
    assert all(d for d in (driver.execute_script("return arguments[0].naturalWidth;", t) for t in thumbs))

    driver.save_screenshot(str(tmp_path / "astsep_app.png"))
    print(f"screenshot: {tmp_path / 'astsep_app.png'}")


@pytest.mark.slow
def test_web_page_shows_the_clis_one_line_error_for_a_bad_upload(browser, server, tmp_path):
    driver = browser
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all" * 10)
    driver.get(server["url"])
    _upload_and_separate(driver, bad)
    _wait_done(driver)
    line = _status(driver)
    assert line.startswith("astsep: error: cannot decode not_audio.wav as audio: ")
    assert "\n" not in line
    assert str(server["cache"]) not in line  # the server's temp path is not shown
    driver.save_screenshot(str(tmp_path / "astsep_app_error.png"))


@pytest.mark.slow
def test_web_page_separates_a_recording_from_the_microphone(browser, server):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server["url"])
    record = _wait(driver, lambda d: d.find_element(By.ID, "record"), 60, "no record box")
    _click(driver, record, "button.record-button")
    time.sleep(2.5)
    _click(driver, record, "button.stop-button")
    _wait(driver, lambda d: record.find_elements(By.CSS_SELECTOR, "time#duration"), 30, "the recording did not stop")
    _click(driver, driver, "#separate")
    _wait_done(driver)
    assert _status(driver).startswith("recording.wav: "), _status(driver)
    players = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".astsep-source"), 30, "no source players")
    assert all("confidence" in p.text for p in players)


@pytest.mark.slow
def test_closing_the_page_removes_the_sessions_uploads_and_outputs(server, tmp_path, shared):
    """Run in a browser of its own, closed at the end: Gradio then ends the session."""
    driver = _chromium()
    path = tmp_path / "mix_to_forget.wav"
    sf.write(path, mixture("dog", "rain", seconds=2.0).numpy(), 16000)
    sessions = server["cache"] / "astsep-sessions"
    try:
        driver.get(server["url"])
        _upload_and_separate(driver, path)
        _wait_done(driver)
        assert "error" not in _status(driver)
        mine = [p for p in server["cache"].rglob("*") if p.name in ("mix_to_forget.wav", "mix_to_forget_astsep.zip")]
        assert len(mine) == 2  # the upload and the zip exist while the page is open
    finally:
        driver.quit()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and [p for p in server["cache"].rglob("mix_to_forget*")]:
        time.sleep(1)
    assert not [p for p in server["cache"].rglob("mix_to_forget*")]
    assert not [p for p in sessions.iterdir() if any(p.rglob("*mix_to_forget*"))]


def _chromium(**kw):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium browser and chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def _long_file(path: Path, seconds: int) -> Path:
    x = mixture("dog", "rain", seconds=5.0).numpy()
    sf.write(path, np.tile(x, seconds // 5), 16000)
    return path


@pytest.mark.slow
def test_a_long_file_shows_window_progress_and_another_users_page_works_meanwhile(browser, server, tmp_path, shared):
    import re

    a = browser
    a.get(server["url"])
    _click(a, a, "#debug input[type=checkbox]")  # no figures: 2 per window would be most of the time
    _upload_and_separate(a, _long_file(tmp_path / "long_a.wav", 240))
    # Gradio's progress on the page: "k/N windows" with the step's name
    _wait(a, lambda d: re.search(r"\d+/\d+ windows", d.find_element("id", "status").text), RUN_TIMEOUT,
          "no window progress while a long file is separated")
    assert "separating long_a.wav" in a.find_element("id", "status").text
    b = _chromium()
    try:
        b.get(server["url"])
        _upload_and_separate(b, next(ESC.glob("dog__*.flac")))
        assert not _status(a), "A finished before B's page was used: nothing shows that it did not block B"
        _wait_done(b)  # B's short file has its own lane (issue 21 item 8): it never waits for A's long one
        assert "source(s)" in _status(b), _status(b)
        _wait_done(a)
        assert _status(a).startswith("long_a.wav: "), _status(a)
    finally:
        b.quit()


@pytest.mark.slow
def test_closing_the_page_stops_its_separation(server, tmp_path, shared):
    import re

    driver = _chromium()
    try:
        driver.get(server["url"])
        _click(driver, driver, "#debug input[type=checkbox]")
        _upload_and_separate(driver, _long_file(tmp_path / "long_closed.wav", 240))
        _wait(driver, lambda d: re.search(r"\d+/\d+ windows", d.find_element("id", "status").text), RUN_TIMEOUT,
              "no window progress")
    finally:
        driver.quit()
    pattern = re.compile(r"page closed: stopped separating long_closed\.wav after (\d+) of (\d+) windows")
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and not pattern.search(server["log"].read_text()):
        time.sleep(1)
    found = pattern.search(server["log"].read_text())
    assert found, "the separation of a closed page was not stopped"
    assert int(found[1]) < int(found[2])
    time.sleep(2)
    assert not list((server["cache"] / "astsep-sessions").rglob("long_closed*"))


def test_app_refuses_a_missing_model_in_one_line_with_the_clis_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "astsep.frontends.app", "--model", str(tmp_path / "nowhere"), "--port", "0"],
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("astsep: error: "), proc.stderr


def test_demo_reports_window_progress_and_zips_every_file(tmp_path, tiny_model_dir, shared):
    """The page's progress bar and zip come from Demo.run: checked here without a browser."""
    from astsep.frontends.app import Demo
    from astsep.runtime import RunOptions

    demo = Demo(RunOptions(model=str(tiny_model_dir), max_passes=1))
    path = tmp_path / "long.wav"
    x = np.concatenate([mixture("dog", "rain", seconds=5.0).numpy()] * 5)  # 25 s: three 10.24 s windows
    sf.write(path, x, 16000)
    seen: list[tuple[int, int]] = []
    run = demo.run(path, tmp_path / "run" / "long", name="my recording.wav", debug=False,
                   progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert run.zip_path.name == "my recording_astsep.zip"
    names = zipfile.ZipFile(run.zip_path).namelist()
    assert "events.json" in names and [v.file.name for v in run.sources] == [n for n in names if n.endswith(".wav")]
    assert all(e["occurred_at_source"] == "queued" for e in run.events)
    assert run.sources[-1].kind == "residual"


def test_an_upload_another_open_session_sent_too_is_kept_until_that_session_closes(tmp_path):
    """Gradio stores uploads by content: two users sending the same file share one path."""
    from astsep.frontends.app import Sessions

    upload = tmp_path / "cache" / "sha" / "same.wav"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"RIFF")
    sessions = Sessions(tmp_path / "cache" / "astsep-sessions")
    run_a = sessions.new_run_dir("a", "same")
    run_a.mkdir()
    for s in ("a", "b"):
        sessions.remember_upload(s, upload)
    sessions.close("a")
    assert upload.exists() and not run_a.exists()
    sessions.close("b")
    assert not upload.exists() and not upload.parent.exists()


def test_demo_without_a_refiner_refuses_a_query_with_the_clis_message(tmp_path, tiny_model_dir, shared):
    from astsep.frontends.app import Demo
    from astsep.runtime import RunOptions
    from astsep.errors import AstsepError

    demo = Demo(RunOptions(model=str(tiny_model_dir)))
    with pytest.raises(AstsepError, match=r"^--query/--query-audio/--negative need a trained refiner"):
        demo.run(next(ESC.glob("dog__*.flac")), tmp_path / "out", query="a dog barking")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_with_a_refiner_extracts_the_queried_sound_and_names_bad_queries_by_file_name(
        tmp_path, tiny_model_dir, shared):
    from astsep.frontends.app import Demo
    from astsep.runtime import RunOptions
    from astsep.errors import AstsepError
    from test_refined_inference import _train_and_save

    ckpt = tmp_path / "audio_query.ckpt"
    _train_and_save(ckpt, "target_audio", 32)  # tiny AST: 32-dim pooled embeddings
    demo = Demo(RunOptions(model=str(tiny_model_dir), refiner=str(ckpt)))
    mix = tmp_path / "mix.wav"
    sf.write(mix, mixture("dog", "rain", seconds=3.0).numpy(), 16000)
    run = demo.run(mix, tmp_path / "run" / "mix", name="mix.wav", query_audio=next(ESC.glob("dog__*.flac")),
                   debug=False)
    assert [v.kind for v in run.sources] == ["source", "residual"]
    assert run.sources[0].label.startswith("dog__") and run.sources[1].label == "rest"
    with pytest.raises(AstsepError, match="use --query-audio FILE"):
        demo.run(mix, tmp_path / "run2" / "mix", query="a dog barking")
    bad = tmp_path / "upload_tmp_dir" / "clip.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"not audio")
    with pytest.raises(AstsepError, match=r"^cannot decode clip\.wav as audio"):  # no server path in the message
        demo.run(mix, tmp_path / "run3" / "mix", query_audio=bad)


def test_runs_older_than_keep_minutes_are_removed_even_while_their_session_is_open(tmp_path):
    from astsep.frontends.app import Sessions

    sessions = Sessions(tmp_path / "astsep-sessions", keep_seconds=60)
    old = sessions.new_run_dir("a", "old")
    old.mkdir()
    (old / "events.json").write_text("{}")
    os.utime(old.parent, (time.time() - 120, time.time() - 120))
    new = sessions.new_run_dir("a", "new")
    assert not old.parent.exists() and new.parent.is_dir() and new.parent != old.parent
