"""The console in headless Chromium (Debian's `chromium` and
`chromium-driver`, through selenium's WebDriver): it lists the topics,
shows a topic's messages live as a Kafka producer writes them, and
publishes from its form. A screenshot is kept as a test artifact."""

import os
import shutil
import time

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from ws_tests.conftest import recv, unb64

ARTIFACTS = os.environ.get(
    "MAGNETAR_ARTIFACTS",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts"))


def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed; run scripts/bootstrap")


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    # An explicit driver keeps selenium from looking for one on the network.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_console_shows_kafka_messages_live(standalone, browser, tag):
    topic = f"console-{tag}"
    admin = AdminClient({"bootstrap.servers": standalone.kafka})
    for f in admin.create_topics([NewTopic(topic, 1)]).values():
        f.result(30)

    browser.get(standalone.http + "/")
    wait = WebDriverWait(browser, 30)
    row = wait.until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, f'.topic-row[data-topic="persistent://public/default/{topic}"]')))
    row.click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "live-state"), "reading from latest"))
    assert f"persistent://public/default/{topic}" in browser.find_element(By.ID, "topic-name").text

    producer = Producer({"bootstrap.servers": standalone.kafka, "linger.ms": 5})
    for i in range(100):
        producer.produce(topic, key=f"k{i % 7}", value=f"kafka message {i:03d}",
                         headers=[("source", b"kafka")])
    assert producer.flush(30) == 0

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages tr.msg")) >= 100)
    rows = browser.find_elements(By.CSS_SELECTOR, "#messages tr.msg")
    assert [r.find_element(By.CSS_SELECTOR, ".payload").text for r in rows] == \
        [f"kafka message {i:03d}" for i in range(100)]
    assert rows[3].find_element(By.CSS_SELECTOR, ".key").text == "k3"
    assert "source=kafka" in rows[0].find_element(By.CSS_SELECTOR, ".props").text

    # The stats and the rate chart follow the admin API: the reader's
    # subscription, the stored bytes and a rate once two samples are in.
    wait.until(lambda d: d.find_element(By.ID, "subs").text == "1")
    wait.until(lambda d: d.find_element(By.ID, "stored").text not in ("", "–", "0 B"))
    wait.until(lambda d: float(d.find_element(By.ID, "rate-in").text.rstrip("k") or 0) > 0
               or d.find_element(By.ID, "rate-in").text.endswith("k"))

    # The broker panel reads /metrics, as Prometheus does: the namespace's
    # counter turns into a rate, and the connection gauges are there.
    def ns_in_rate(d):
        rows = d.find_elements(By.CSS_SELECTOR, '#namespaces tr[data-namespace="public/default"] td')
        return rows and rows[1].text not in ("", "0")
    wait.until(ns_in_rate)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#connections [data-protocol="http"]'))
    assert "from /metrics" in browser.find_element(By.ID, "broker-state").text

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "console.png")
    assert browser.save_screenshot(shot)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_console_publishes_from_its_form(standalone, browser, ws, tag):
    topic = f"form-{tag}"
    with ws.producer(topic) as p:  # creates the topic
        p.send('{"payload":"c2VlZA=="}')
        p.recv(timeout=10)
    with ws.consumer(topic, "watch") as c:
        browser.get(standalone.http + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, f'.topic-row[data-topic="persistent://public/default/{topic}"]'))
        ).click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "live-state"), "reading"))
        browser.find_element(By.ID, "pub-key").send_keys("browser-key")
        browser.find_element(By.ID, "pub-props").send_keys("from=console")
        browser.find_element(By.ID, "pub-payload").send_keys("hello from the page")
        # The producer socket opens with the topic; retry until it took it.
        deadline = time.time() + 15
        while "published" not in browser.find_element(By.ID, "pub-result").text:
            assert time.time() < deadline, browser.find_element(By.ID, "pub-result").text
            browser.find_element(By.CSS_SELECTOR, "#publish button").click()
            time.sleep(0.5)
        m = recv(c)
        assert unb64(m["payload"]) == b"hello from the page"
        assert m["key"] == "browser-key" and m["properties"] == {"from": "console"}
        # The live view shows it too.
        wait.until(lambda d: any(
            r.text.endswith("hello from the page") or "hello from the page" in r.text
            for r in d.find_elements(By.CSS_SELECTOR, "#messages tr.msg")))


def test_console_with_authentication_keeps_its_token_out_of_urls(secured, browser, tag):
    """With authentication on, the console's sockets log in with the token
    as a `bearer.<jwt>` subprotocol, never in the URL: the page reads a
    topic live (its reader socket would get 401 otherwise, as its URL
    carries no token), and no URL the page loaded holds one."""
    topic = f"auth-console-{tag}"
    token = secured.token("admin")
    producer = Producer({"bootstrap.servers": secured.kafka, "security.protocol": "SASL_PLAINTEXT",
                         "sasl.mechanism": "PLAIN", "sasl.username": "public/default",
                         "sasl.password": "token:" + token})
    producer.produce(topic, b"seed")
    assert producer.flush(30) == 0

    browser.get(secured.http + "/")
    browser.execute_script("localStorage.setItem('magnetar.token', arguments[0])", token)
    browser.refresh()
    wait = WebDriverWait(browser, 30)
    wait.until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, f'.topic-row[data-topic="persistent://public/default/{topic}"]'))
    ).click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "live-state"), "reading from latest"))
    for i in range(5):
        producer.produce(topic, f"secret {i}".encode())
    assert producer.flush(30) == 0
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages tr.msg")) >= 5)
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert not any("token=" in u for u in urls), urls
