"""The HTML page: one file, nothing external, findings first, everything escaped; and a real browser opens it."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from signalprop import SignalpropError
from signalprop.diagnosis import Report
from signalprop.diagnosis._findings import Finding
from signalprop.report import html
from signalprop.report._common import as_view

from .conftest import FakeReport, findings_for, make_trace, nonfinite_trace


class _Collector(HTMLParser):
    """Tags, attributes and text of a page, and whether every opened element was closed."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(text: str) -> _Collector:
    p = _Collector()
    p.feed(text)
    p.close()
    assert p.stack == [], f"unclosed elements: {p.stack}"
    return p


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    t = make_trace(hist=True, names=["<script>alert(1)</script>", "features.2", "a&b", "c", "d"])
    findings = [
        Finding("vanishing", "warning", "<script>alert(1)</script>", "std < 0.1 & falling", "he_ <b>std</b>"),
        Finding("nonfinite", "error", "input", "the input already holds NaN", "clean the data"),
        Finding("dead_units", "info", "features.1", "50% zeros", ""),
    ]
    rep = FakeReport(findings, t, predicted=make_trace(source="predicted", band=True),
                     meta={"model": "<img src=x onerror=alert(2)>"})
    path = html.write_html(rep, tmp_path_factory.mktemp("html") / "report.html")
    return path, path.read_text(encoding="utf-8")


def test_one_self_contained_file(page: tuple[Path, str]) -> None:
    path, text = page
    assert path.suffix == ".html" and list(path.parent.iterdir()) == [path]
    p = _parse(text)
    without_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"(https?:)?//[a-z]", without_data), "no external URL"
    imgs = [attrs for tag, attrs in p.tags if tag == "img"]
    assert len(imgs) == 3  # std, SPP, histograms
    for attrs in imgs:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(tag in ("script", "link", "iframe") for tag, _ in p.tags)
    csp = [a for tag, a in p.tags if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0]["content"] or "")


def test_findings_come_first_worst_first_then_table_then_plots(page: tuple[Path, str]) -> None:
    _, text = page
    i_err = text.index("the input already holds NaN")
    i_warn = text.index("std &lt; 0.1 &amp; falling")
    i_info = text.index("50% zeros")
    assert i_err < i_warn < i_info < text.index("<table") < text.index("<img")
    assert "needs attention" in text


def test_user_strings_are_escaped(page: tuple[Path, str]) -> None:
    _, text = page
    assert "<script>" not in text and "<img src=x" not in text and "<b>std</b>" not in text
    p = _parse(text)
    body = "".join(p.text)
    assert "<script>alert(1)</script>" in body  # shown as text, in the finding and the table
    assert "<img src=x onerror=alert(2)>" in body and "a&b" in body


def test_table_rows_match_the_trace(page: tuple[Path, str]) -> None:
    _, text = page
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", text.split("<tbody>")[1])
    assert len(rows) == len(make_trace())
    assert "0.0625" in rows[8] and "Conv2d" in rows[8]


def test_trace_only_real_report_and_ok_status(tmp_path: Path) -> None:
    t = nonfinite_trace()
    text = html.write_html(t, tmp_path / "t.html").read_text()
    assert "trace only (not diagnosed)" in text and "non-finite fwd / grad" in text
    rep = Report([], make_trace())
    assert rep.to_html(tmp_path / "m.html") == tmp_path / "m.html"  # Report.to_html delegates to write_html
    text = (tmp_path / "m.html").read_text()
    assert "OK: no warnings or errors" in text and "No findings: every rule passed." in text
    short = html._table(as_view(FakeReport(findings_for(make_trace(12)), make_trace(12))), max_rows=6)
    assert "layers not shown" in short and "features.22" in short  # the flagged layer stays


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(SignalpropError, match=r"\.html"):
        html.write_html(make_trace(), tmp_path / "r.png")
    with pytest.raises(SignalpropError, match="str or pathlib.Path"):
        html.write_html(make_trace(), None)  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="sp.diagnose"):
        html.write_html({"trace": 1}, tmp_path / "r.html")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_page(page: tuple[Path, str], tmp_path: Path) -> None:
    from matplotlib.image import imread

    path, _ = page
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--window-size=1200,1600", f"--screenshot={shot}", path.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}"
    img = imread(shot)
    assert img.shape[:2] == (1600, 1200)
    rgb = img[..., :3]
    # a rendered page, not a blank or an error page: many distinct colors, including the error finding's red
    assert len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200
    red = (rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.25) & (rgb[..., 2] < 0.25)
    assert red.sum() > 100
