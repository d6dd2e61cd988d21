"""The console in headless Chromium against a dev-style run: sign in, watch, tap, a retrying listener, dead letters."""

from __future__ import annotations

import re

import aiohttp
import orjson
from playwright.async_api import expect

from listenerd.dev import DEV_TOKEN, TENANT
from listenerd.sim.engine import Answer
from listenerd.testing import wait_for
from tests.browser.conftest import screenshot_path, sign_in


async def received(page, listener_id: str) -> int:
    text = await page.locator(f"#row-{TENANT}-{listener_id} td.received").text_content()
    return int(text) if text and text.isdigit() else -1


async def test_a_wrong_token_is_refused_and_never_stored(dev_stack, page):
    await sign_in(page, dev_stack, token="not-the-token")
    await expect(page.get_by_role("alert")).to_have_text("The daemon refused this token.")
    await expect(page.locator("#overview")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('listenerd-token')") is None
    assert "not-the-token" not in page.url


async def test_the_console_works_from_the_keyboard(dev_stack, page):
    await page.goto(f"{dev_stack.daemon.api_url}/console/")
    await expect(page.get_by_label("API token")).to_be_focused()
    await page.keyboard.type(DEV_TOKEN)
    await page.keyboard.press("Enter")
    await expect(page.locator(f"#row-{TENANT}-LI1 .status")).to_have_text("started", timeout=30_000)
    for _ in range(10):  # skip link, sign out, the status filter, then the listener links in order
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.textContent") == "LI1":
            break
    else:
        raise AssertionError("LI1's link is not reachable with Tab")
    await page.keyboard.press("Enter")
    await expect(page.locator("#detail-status")).to_have_text("started")
    await page.get_by_role("button", name="Sign out").press("Enter")
    await expect(page.get_by_label("API token")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('listenerd-token')") is None


async def test_listeners_live_and_a_listeners_tapped_events(dev_stack, page, tmp_path):
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    await sign_in(page, dev_stack)
    for lid in ("LI1", "LI2", "LI3"):
        await expect(page.locator(f"#row-{TENANT}-{lid} .status")).to_have_text("started", timeout=30_000)
    assert await page.evaluate("sessionStorage.getItem('listenerd-token')") == DEV_TOKEN
    assert DEV_TOKEN not in page.url
    first = await wait_for(lambda: received(page, "LI3"), what="a received count", timeout=20)
    await wait_for(lambda: _more(page, "LI3", first), timeout=20, what="LI3's received count to rise")
    await expect(page.locator("#engine-state")).to_have_text(re.compile("idle|delivering"))
    await wait_for(lambda: _spark_points(page, "LI3", 6), timeout=30, what="a sparkline of six rates")
    await expect(page.locator("#dead-letters")).to_have_text("No dead letters.")
    await page.screenshot(path=screenshot_path(tmp_path, "console.png"))

    await page.get_by_role("link", name="LI3").click()
    await expect(page.get_by_role("heading", level=2, name=re.compile("LI3"))).to_be_visible()
    await expect(page.locator("#detail-status")).to_have_text("started")
    await expect(page.locator("#detail-mapping")).to_contain_text("customer.name")
    await expect(page.locator("#detail-history li").last).to_contain_text("started")
    await wait_for(lambda: _count_at_least(page, "#tap-events li.event", 3), timeout=20, what="three tapped events")
    assert '"order":' in (await page.locator("#tap-events li.event").first.text_content())
    await page.screenshot(path=screenshot_path(tmp_path, "console-listener.png"))

    await page.get_by_role("link", name="All listeners").click()
    await expect(page.locator("#tap-state")).to_be_hidden()
    assert errors == []
    assert requests and all(url.startswith(dev_stack.daemon.api_url + "/") for url in requests)  # no CDN, no internet
    assert not any(DEV_TOKEN in url for url in requests)
    unlabelled = await page.evaluate("""() => [
        ...[...document.querySelectorAll('input')].filter((i) => !i.labels.length).map((i) => i.outerHTML),
        ...[...document.querySelectorAll('button, a')].filter((b) => !(b.getAttribute('aria-label')
            || b.textContent.trim())).map((b) => b.outerHTML),
        ...[...document.querySelectorAll('svg[role=img]')].filter((s) => !s.querySelector('title')?.textContent)
            .map((s) => s.outerHTML)]""")
    assert unlabelled == []


async def test_a_listener_turns_retrying_when_its_simulator_drops_it(dev_stack, page):
    await sign_in(page, dev_stack)
    row = page.locator(f"#row-{TENANT}-LI3")
    await expect(row.locator(".status")).to_have_text("started", timeout=30_000)
    dev_stack.pusher.refuse_connections(503)
    dev_stack.pusher.drop_all()
    await expect(row.locator(".status")).to_have_text("retrying", timeout=20_000)
    await expect(row.locator("td.message")).to_contain_text("503")
    dev_stack.pusher.refuse_connections(None)
    await expect(row.locator(".status")).to_have_text("started", timeout=30_000)
    await row.get_by_role("link", name="LI3").click()
    history = page.locator("#detail-history")
    await expect(history).to_contain_text("retrying")


async def test_a_dead_letter_is_retried_and_another_discarded_from_the_console(dev_stack, page, tmp_path):
    dev_stack.engine.script([Answer(400, {}, {"error": "field 'amount' is not a number"}),
                             Answer(422, {}, {"error": "unknown tenant"})])
    letters = await wait_for(lambda: _dead_letters(dev_stack, 2), timeout=20, what="two dead letters")
    letter, other = letters[:2]  # a refused batch is kept per listener: there may be more
    await sign_in(page, dev_stack)
    row = page.locator(f"#dead-{TENANT}-{letter.id}")
    await expect(row).to_contain_text("field 'amount' is not a number")
    await expect(row).to_contain_text("400")
    await page.screenshot(path=screenshot_path(tmp_path, "console-dead-letters.png"), full_page=True)
    await row.get_by_role("button", name=re.compile("Retry")).click()
    await expect(page.locator("#dead-message")).to_contain_text("queued for delivery again")
    await expect(row).to_have_count(0)
    ids = {event["id"] for event in orjson.loads(letter.events)}
    sink = dev_stack.workdir / "engine-events.jsonl"
    await wait_for(lambda: ids <= {orjson.loads(line)["id"] for line in sink.read_bytes().splitlines()},
                   timeout=20, what="the retried events at the engine")

    page.once("dialog", lambda dialog: dialog.accept())  # "Discard dead letter N for good?"
    row = page.locator(f"#dead-{TENANT}-{other.id}")
    await row.get_by_role("button", name=re.compile("Discard")).click()
    await expect(page.locator("#dead-message")).to_have_text(f"Dead letter {other.id} discarded.")
    await expect(row).to_have_count(0)
    left = {d.id for d in await dev_stack.daemon.dead_letters.of_tenant(TENANT, None)}
    assert letter.id not in left and other.id not in left


async def _more(page, listener_id: str, than: int) -> bool:
    return await received(page, listener_id) > than


async def _spark_points(page, listener_id: str, count: int) -> bool:
    points = await page.locator(f"#row-{TENANT}-{listener_id} svg.spark polyline").get_attribute("points")
    return len((points or "").split()) >= count


async def _count_at_least(page, selector: str, count: int) -> bool:
    return await page.locator(selector).count() >= count


async def _dead_letters(stack, count: int):
    letters = await stack.daemon.dead_letters.of_tenant(TENANT, None)
    return letters if len(letters) >= count else None


async def test_a_tenant_of_many_pages_is_paged_with_its_counts_on_top_and_statuses_asked_for_one_page(
        dev_stack, page, tmp_path):
    """120 more listeners (disabled) than the demo's: the table shows a page of 50 and turns pages through the
    API's Link; the counts come from the summary route, and no refresh asks a status the page does not show."""
    base = f"{dev_stack.daemon.api_url}/1.0/tenants/{TENANT}/listeners"
    headers = {"Authorization": f"Bearer {DEV_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for n in range(1, 121):
            body = {"id": f"X{n}", "type": "pusher", "status": False, "options": {"channel": f"bulk-{n}"}}
            async with http.post(base, json=body) as response:
                assert response.status == 201, await response.text()
        async with http.get(f"{base}/status") as response:
            total = (await response.json())["total"]
    assert total > 120
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    await sign_in(page, dev_stack)
    box = page.locator(f"#box-{TENANT}")
    await expect(page.locator(f"#summary-{TENANT}")).to_contain_text(f"{total} listener(s)")
    await expect(page.locator(f"#summary-{TENANT}")).to_contain_text("120 stopped")
    await expect(box.locator(".range")).to_have_text(f"Listeners 1-50 of {total}")
    await expect(page.locator(f"#row-{TENANT}-LI1")).to_be_visible()
    await expect(box.locator("tbody tr")).to_have_count(50)
    await expect(page.locator(f"#row-{TENANT}-X120")).to_have_count(0)
    await expect(box.get_by_role("button", name="Previous page")).to_be_disabled()
    await page.screenshot(path=screenshot_path(tmp_path, "console-pages.png"))

    requests.clear()
    await wait_for(lambda: _summaries(requests) >= 3, timeout=20, what="three refreshes")
    one_by_one = [url for url in requests if re.search(r"/listeners/[^/]+/status$", url)]
    assert len(one_by_one) <= 3 * 50  # a refresh asks for the page's statuses at most
    assert not any("/listeners/X" in url for url in one_by_one)  # not-started ones come with the summary

    await box.get_by_role("button", name="Next page").click()
    await expect(box.locator(".range")).to_have_text(f"Listeners 51-100 of {total}")
    await expect(page.locator(f"#row-{TENANT}-LI1")).to_have_count(0)
    await box.get_by_role("button", name="Next page").click()
    await expect(box.locator(".range")).to_have_text(f"Listeners 101-{total} of {total}")
    await expect(page.locator(f"#row-{TENANT}-X120 .status")).to_have_text("stopped")
    await expect(box.get_by_role("button", name="Next page")).to_be_disabled()
    assert any("cursor=" in url for url in requests)  # the pages came from the Link header's URL
    await box.get_by_role("button", name="Previous page").click()
    await expect(box.locator(".range")).to_have_text(f"Listeners 51-100 of {total}")

    await box.get_by_label("Show").select_option("stopped")
    await expect(box.locator(".range")).to_have_text("Listeners 1-50 of 120")
    await expect(page.locator(f"#row-{TENANT}-X1")).to_be_visible()
    await expect(page.locator(f"#row-{TENANT}-LI1")).to_have_count(0)
    await expect(box.get_by_role("button", name="Previous page")).to_be_disabled()


def _summaries(urls: list[str]) -> int:
    return sum(url.endswith(f"/tenants/{TENANT}/listeners/status") for url in urls)
