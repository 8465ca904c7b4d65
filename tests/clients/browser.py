"""A real headless Chromium for the console's end-to-end tests, driven by selenium.

Reads one JSON command per line on stdin and answers one JSON line on stdout:
{"ok": true, "value": ...} or {"ok": false, "error": "..."}. Commands:

  {"op": "open", "url": U}                      load a page
  {"op": "type", "css": C, "text": T}           clear a field and type into it
  {"op": "click", "css": C}                     click an element
  {"op": "file", "css": C, "path": P}           choose a file in an <input type=file>
  {"op": "text", "css": C}                      an element's visible text
  {"op": "wait_text", "css": C, "contains": S, "timeout": SECONDS}
                                                wait until the element's text contains S
  {"op": "visible", "css": C}                   whether the element is displayed
  {"op": "js", "script": S}                     run `S` (a function body) and return its value
  {"op": "screenshot", "path": P}               save a PNG of the window
  {"op": "quit"}

Environment: SLUICE_CHROMIUM (default /usr/bin/chromium), SLUICE_CHROMEDRIVER (default
/usr/bin/chromedriver).
"""

import json
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def start():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("SLUICE_CHROMIUM", "/usr/bin/chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    service = Service(os.environ.get("SLUICE_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def run(driver, command):
    op = command["op"]
    if op == "open":
        driver.get(command["url"])
        return None
    if op == "type":
        element = driver.find_element(By.CSS_SELECTOR, command["css"])
        element.clear()
        element.send_keys(command["text"])
        return None
    if op == "click":
        driver.find_element(By.CSS_SELECTOR, command["css"]).click()
        return None
    if op == "file":
        driver.find_element(By.CSS_SELECTOR, command["css"]).send_keys(command["path"])
        return None
    if op == "text":
        return driver.find_element(By.CSS_SELECTOR, command["css"]).text
    if op == "visible":
        return driver.find_element(By.CSS_SELECTOR, command["css"]).is_displayed()
    if op == "wait_text":
        deadline = time.monotonic() + command.get("timeout", 10)
        text = ""
        while time.monotonic() < deadline:
            elements = driver.find_elements(By.CSS_SELECTOR, command["css"])
            text = elements[0].text if elements else ""
            if command["contains"] in text:
                return text
            time.sleep(0.1)
        raise TimeoutError(
            f"{command['css']} never contained {command['contains']!r}; last text: {text!r}")
    if op == "js":
        return driver.execute_script(command["script"])
    if op == "screenshot":
        os.makedirs(os.path.dirname(command["path"]) or ".", exist_ok=True)
        if not driver.save_screenshot(command["path"]):
            raise RuntimeError("the screenshot was not saved")
        return command["path"]
    raise ValueError(f"unknown op {op!r}")


def main():
    driver = start()
    try:
        print(json.dumps({"ok": True, "value": "started"}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "quit":
                break
            try:
                answer = {"ok": True, "value": run(driver, command)}
            except Exception as error:  # the test reads the failure and fails itself
                answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(answer), flush=True)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
