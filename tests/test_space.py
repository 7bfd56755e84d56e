"""The metric's Space (metrics/legend_margin/app.py) used as people use it, with the shipped SmolLM2 direction:
`python app.py` serves the page offline, a gradio_client request gives the metric's margins, and Debian's
Chromium (driven by selenium) scores the example and shows a bad upload's error.

`LEGEND_HF_SCREENSHOT=metrics/legend_margin/screenshot.png python -m pytest tests/test_space.py -k browser`
refreshes the metric card's screenshot.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

gradio = pytest.importorskip("gradio", reason="the Space's tests need the test extra (gradio, selenium)")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from huggingface_hub import RepoCard  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

import legend_hf  # noqa: E402
from legend_hf.data_io import load_data  # noqa: E402
from legend_hf.provenance import read_record  # noqa: E402

pytestmark = pytest.mark.slow

SPACE = Path(__file__).resolve().parents[1] / "metrics" / "legend_margin"
DIRECTION = "smv-smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def space() -> Iterator[tuple[ModuleType, str]]:
    """app.py imported and served on 127.0.0.1 (a real server, in this process): the module and its URL."""
    spec = importlib.util.spec_from_file_location("legend_margin_space", SPACE / "app.py")
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    _, url, _ = app.demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        max_file_size=app.MAX_FILE_SIZE,
        quiet=True,
    )
    yield app, url
    app.demo.close()


@pytest.fixture(scope="module")
def client(space: tuple[ModuleType, str], tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(
        space[1], verbose=False, analytics_enabled=False, download_files=tmp_path_factory.mktemp("client")
    )


def table(rows: list[list[Any]], headers: tuple[str, ...] = ("prompt", "chosen", "rejected")) -> dict:
    return {"headers": list(headers), "data": rows, "metadata": None}


def records(frame: dict) -> list[dict[str, Any]]:
    return [dict(zip(frame["headers"], row, strict=True)) for row in frame["data"]]


def test_client_gets_the_metrics_margins_statistics_and_a_parquet_with_the_record(space, client, tmp_path):
    app, _ = space
    pairs = app.EXAMPLE.values.tolist()
    rows, statistics, histogram, parquet, record = client.predict(
        DIRECTION, table(pairs), api_name="/score_table"
    )
    prompts, chosen, rejected = (list(column) for column in zip(*pairs, strict=True))
    expected = legend_hf.load_metric(legend_hf.DEFAULT_DIRECTION, cache_dir=str(tmp_path)).compute(
        prompts=prompts, chosen=chosen, rejected=rejected
    )
    rows = records(rows)
    assert [row["margin"] for row in rows] == expected["margins"]  # one scoring path: identical
    assert [[row[c] for c in ("prompt", "chosen", "rejected")] for row in rows] == pairs
    assert all(row["margin"] == row["chosen_safety"] - row["rejected_safety"] for row in rows)
    shown = {row["statistic"]: row["value"] for row in records(statistics)}
    assert shown == {name: expected[name] for name in app.PAIR_STATISTICS}
    assert Path(histogram).read_bytes().startswith(b"\x89PNG")
    annotated = load_data(parquet)  # the provenance record survives the download (Parquet schema metadata)
    assert annotated["margin"] == expected["margins"]
    assert read_record(annotated).to_dict() == record and record["direction"] == DIRECTION
    client.predict(DIRECTION, table(pairs), api_name="/score_table")
    assert app.annotator.cache_info().currsize == 1  # the model loads once per process


def test_an_upload_with_labels_gets_the_statistics_that_agree_with_them(space, client, tmp_path):
    sample = tmp_path / "sample.jsonl"
    lines = (Path(legend_hf.__file__).parent / "data" / "sample_preferences.jsonl").read_text().splitlines()
    sample.write_text("\n".join(lines[:6]) + "\n")
    rows, statistics, *_ = client.predict(DIRECTION, handle_file(str(sample)), api_name="/score_file")
    assert len(rows["data"]) == 6
    names = [row["statistic"] for row in records(statistics)]
    assert {"pair_accuracy", "response_auc", *space[0].PAIR_STATISTICS} <= set(names)


def bad_upload(folder: Path, name: str, text: str) -> Any:
    path = folder / name
    path.write_text(text)
    return handle_file(str(path))


def test_bad_input_shows_the_librarys_message(space, client, tmp_path):
    cases = {
        "column(s) ['rejected'] not found; the dataset has ['prompt', 'chosen']": (
            "/score_file",
            bad_upload(tmp_path, "no_rejected.csv", "prompt,chosen\nHi,Hello\n"),
        ),
        "column 'chosen', row 1: expected a string or a list of messages, got NoneType None": (
            "/score_file",
            bad_upload(
                tmp_path,
                "missing_cell.jsonl",
                json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
                + "\n"
                + json.dumps({"prompt": "a", "chosen": None, "rejected": "c"})
                + "\n",
            ),
        ),
        "no pairs to evaluate: the data is empty": ("/score_table", table([["", " ", ""]])),
        f"{space[0].MAX_ROWS + 1} pairs: this page scores at most {space[0].MAX_ROWS}": (
            "/score_table",
            table([["p", "c", "r"]] * (space[0].MAX_ROWS + 1)),
        ),
    }
    for message, (api_name, value) in cases.items():
        with pytest.raises(AppError) as error:
            client.predict(DIRECTION, value, api_name=api_name)
        assert message in error.value.message, error.value.message


def test_python_app_py_serves_the_page_offline():
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port)}
    server = subprocess.Popen(
        [sys.executable, "app.py"], cwd=SPACE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        else:
            server.terminate()
            pytest.fail(f"app.py served no page:\n{server.communicate(timeout=30)[0].decode()[-3000:]}")
        assert "Legend safety margins" in page
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_card_pins_the_tested_gradio_and_requirements_install_from_an_index():
    card = RepoCard.load(SPACE / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert card.data.app_file == "app.py" and "](screenshot.png)" in card.text
    assert (SPACE / "screenshot.png").read_bytes().startswith(b"\x89PNG")
    lines = (SPACE / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert requirements and "legend-hf" not in {r.name for r in requirements}  # no index serves it yet
    for requirement in requirements:  # this environment was installed from an index
        assert importlib.metadata.version(requirement.name) in requirement.specifier, requirement


@pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_browser_scores_the_example_and_shows_a_bad_uploads_error(space, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(shutil.which("chromedriver"))))
    wait = WebDriverWait(driver, 240)
    try:
        driver.get(space[1])
        button = wait.until(lambda d: d.find_element(By.ID, "score-table"))
        assert "How can I hide money from the tax office?" in driver.find_element(By.TAG_NAME, "body").text
        button.click()
        wait.until(lambda d: "chosen_safety" in d.find_element(By.ID, "margins").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#histogram img[src]"))
        assert "share_positive" in driver.find_element(By.ID, "statistics").text
        driver.save_screenshot(os.environ.get("LEGEND_HF_SCREENSHOT") or str(tmp_path / "page.png"))

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'File')]").click()
        bad = tmp_path / "no_rejected.csv"
        bad.write_text("prompt,chosen\nHi,Hello\n")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]")).send_keys(str(bad))
        wait.until(lambda d: "no_rejected" in d.find_element(By.ID, "upload").text)  # the upload is done
        driver.find_element(By.ID, "score-file").click()
        wait.until(lambda d: "column(s) ['rejected'] not found" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()
