#!/usr/bin/env python3
"""Drive the chat page of a running `edge-ssd serve` in headless Chromium, as a person would:
open it, give the API key if it asks, set the settings, type a message, wait for the streamed
reply and its statistics, take a screenshot.

    edge-ssd serve --bundle models/qwen2.5-coder-0.5b-1.5b --port 8080 &
    python tools/chat_screenshot.py --url http://127.0.0.1:8080 --out docs/img/chat.png \\
        --message "Write a Python function that checks whether a number is prime." \\
        --set temperature=0 --set max_tokens=80 --set show_sources=true

Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver) and
selenium (the test extra). tests/test_web.py uses the same functions.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

WINDOW = (1100, 860)


class PageError(RuntimeError):
    """The browser or the page cannot do what was asked (the message says what to do)."""


def browser_paths() -> tuple:
    """(chromium, chromedriver) on PATH, or None for each that is missing."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    return chromium, shutil.which("chromedriver")


def start_browser(window: tuple = WINDOW):
    """Headless Chromium through its matching chromedriver: no driver download, no network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    if not chromium or not driver:
        raise PageError("needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={window[0]},{window[1]}"):
        opts.add_argument(arg)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts.add_argument("--no-sandbox")   # Chromium's sandbox refuses to run as root (CI containers)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def open_page(driver, url: str, key: Optional[str] = None, timeout: float = 20) -> None:
    """Load the page; type the API key into its dialog when it asks; wait until it is ready."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d) -> bool:
        return d.find_element(By.ID, "server-status").text == "ready"

    def ready_or_asking(d) -> bool:
        return ready(d) or bool(d.find_elements(By.CSS_SELECTOR, "#key-dialog[open]"))

    driver.get(url.rstrip("/") + "/")
    WebDriverWait(driver, timeout).until(ready_or_asking, message="the page neither got ready nor asked for a key")
    if not ready(driver):
        if key is None:
            raise PageError("the server wants an API key: pass --key or set EDGE_SSD_API_KEY")
        driver.find_element(By.ID, "key-input").send_keys(key)
        driver.find_element(By.ID, "key-ok").click()
    WebDriverWait(driver, timeout).until(ready, message="the page did not report the server ready")


def apply_settings(driver, settings: dict) -> None:
    """Set the settings panel's fields by id: inputs typed into, selects chosen, checkboxes ticked."""
    from selenium.webdriver.support.ui import Select

    for name, value in settings.items():
        el = driver.find_element("id", name)
        if el.tag_name == "select":
            Select(el).select_by_value(str(value))
        elif el.get_attribute("type") == "checkbox":
            if el.is_enabled() and el.is_selected() != bool(value):
                el.click()
        else:
            el.clear()
            el.send_keys(str(value))


def send_message(driver, message: str, timeout: float = 60) -> dict:
    """Type `message`, press Enter, wait for the reply's statistics (or its error).

    Returns {"text", "stats": {name: shown text}, "spans": [(source class, text)], "error"}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = driver.find_element("id", "message")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)

    def finished(d):
        replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        last = replies[-1] if len(replies) > before else None
        done = last is not None and (last.find_elements(By.CSS_SELECTOR, ".stats.done")
                                     or "error" in last.get_attribute("class"))
        return last if done else False

    reply = WebDriverWait(driver, timeout).until(finished, message="the reply never finished rendering")
    text = reply.find_element(By.CSS_SELECTOR, ".text")
    failed = "error" in reply.get_attribute("class")
    return {
        "text": text.get_attribute("textContent"),
        "stats": {s.get_attribute("data-stat"): s.text for s in reply.find_elements(By.CSS_SELECTOR, ".stat")},
        "spans": [(s.get_attribute("class"), s.get_attribute("textContent"))
                  for s in text.find_elements(By.CSS_SELECTOR, "span")],
        "error": reply.find_element(By.CSS_SELECTOR, ".stats").text if failed else None,
    }


def parse_setting(text: str) -> tuple:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes NAME=VALUE, got {text!r}")
    return name, {"true": True, "false": False}.get(value, value)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--out", type=Path, required=True, help="the screenshot (PNG)")
    ap.add_argument("--message", action="append", required=True, help="one per turn; repeat for more turns")
    ap.add_argument("--key", default=os.environ.get("EDGE_SSD_API_KEY"), help="default: $EDGE_SSD_API_KEY")
    ap.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[],
                    help="a settings field by id: temperature, max_tokens, mode, drafter, show_sources")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for each reply")
    ap.add_argument("--window", default=f"{WINDOW[0]}x{WINDOW[1]}", help="browser window, WIDTHxHEIGHT")
    args = ap.parse_args(argv)
    try:
        return screenshot(args)
    except PageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def screenshot(args) -> int:
    try:
        window = tuple(int(x) for x in args.window.lower().split("x"))
    except ValueError:
        raise PageError(f"--window takes WIDTHxHEIGHT, got {args.window!r}") from None
    driver = start_browser(window)
    try:
        open_page(driver, args.url, args.key)
        apply_settings(driver, dict(args.settings))
        for message in args.message:
            reply = send_message(driver, message, args.timeout)
            if reply["error"]:
                raise PageError(f"the reply failed: {reply['error']}")
            print(" · ".join(reply["stats"].values()), file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
