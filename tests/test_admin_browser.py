"""The admin in a real browser: a staff user logs in to the live server in headless Chromium,
opens the dead letters, selects one that a real worker produced, runs "Replay" from the
actions menu, and the handler runs again on the worker with the same call id.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them); runs in
``make test``'s PostgreSQL pass, where the real workers are.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from pytest_django.live_server_helper import LiveServer
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.conftest import missing
from tests.test_replay_worker import fail_for_good, flaky_record
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "make browser (or, as root: apt-get install chromium chromium-driver)"
# A loaded 2-core machine can take many seconds to start Chromium or render a page.
TIMEOUT = 60
# The flags Chromium needs here: no sandbox as root, and no calls home on a closed network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1920,1000",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium driven by chromedriver, with a fresh profile."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            missing(f"the browser test needs {path}; install Chromium with: {INSTALL}")
    options = webdriver.ChromeOptions()
    # Both paths given: Selenium does not try to download a browser or a driver.
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def staff_user(key: str) -> User:
    """Staff, not superuser: only view and change on dead letters, as an operator would have."""
    user = User.objects.create_user(f"ops-{key[:8]}", password="a-browser-test-pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_deadletter", "change_deadletter"])
    )
    return user


def test_replay_from_the_admin_in_a_browser_runs_the_handler_on_the_worker(
    deferred_to: Worker, live_server: LiveServer, browser: WebDriver, tmp_path: Path
) -> None:
    key = uuid.uuid4().hex
    letter = fail_for_good(key)  # on the worker: 4 runs fail, retries exhausted
    user = staff_user(key)
    wait = WebDriverWait(browser, TIMEOUT)

    browser.get(f"{live_server.url}/admin/")
    wait.until(ec.visibility_of_element_located((By.ID, "id_username"))).send_keys(user.username)
    browser.find_element(By.ID, "id_password").send_keys("a-browser-test-pw")
    browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    wait.until(ec.element_to_be_clickable((By.LINK_TEXT, "Dead letters"))).click()

    row = wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, f"input.action-select[value='{letter.pk}']"))
    )
    assert letter.call_id in browser.find_element(By.ID, "result_list").text
    row.click()
    assert row.is_selected()
    Select(browser.find_element(By.NAME, "action")).select_by_value("replay_selected")
    browser.find_element(By.CSS_SELECTOR, "div.actions button[name=index]").click()

    # The action's redirect renders the list again, with the message and the replay time.
    wait.until(
        ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, "ul.messagelist li.success"), "Replayed 1 dead letter(s)"
        )
    )
    assert not browser.find_elements(By.CSS_SELECTOR, "ul.messagelist li.warning")
    replayed_at = browser.find_element(By.CSS_SELECTOR, "#result_list td.field-replayed_at")
    assert replayed_at.text not in ("", "-")
    screenshot = tmp_path / f"dead-letters-after-replay-{deferred_to.broker}.png"
    assert browser.save_screenshot(str(screenshot))

    # The worker runs the handler a 5th time, past its 4 failures, as the same call.
    rerun = flaky_record(key)
    assert rerun["attempts"] == "5" and rerun["call"] == repr(letter.call_id)
    letter.refresh_from_db()
    assert letter.replayed_at is not None
    print(f"\n[{deferred_to.broker}] replayed from the admin in Chromium; screenshot: {screenshot}")
