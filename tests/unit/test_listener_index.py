"""The in-memory listener index: natural id order, pages that hold their place, and tenants kept apart."""

from listenerd.listener_index import ListenerIndex, sort_key
from listenerd.model import load_listener


def spec(listener_id: str, kind: str = "pusher"):
    options = {"pusher": {"channel": "c"}, "datasift": {"hash": "h"}}[kind]
    return load_listener({"id": listener_id, "type": kind, "options": options}, "api")


def ids(specs):
    return [s.id for s in specs]


def test_ids_sort_naturally_with_the_id_as_a_tie_break():
    order = sorted(["LI10", "LI2", "A", "LI1", "B7", "LI", "LI02", "a1"], key=sort_key)
    assert order == ["A", "B7", "LI", "LI1", "LI02", "LI2", "LI10", "a1"]


def test_pages_continue_after_a_deleted_id_and_include_later_inserts():
    index = ListenerIndex()
    index.replace([("t", spec(f"LI{i}")) for i in range(1, 8)] + [("u", spec("LI1"))])
    page, more = index.page("t", None, 3)
    assert ids(page) == ["LI1", "LI2", "LI3"] and more
    index.remove("t", "LI3")  # the cursor's own item
    index.remove("t", "LI5")
    index.put("t", spec("LI9"))
    index.put("t", spec("LI0"))  # before the cursor: not on a later page
    page, more = index.page("t", "LI3", 3)
    assert ids(page) == ["LI4", "LI6", "LI7"] and more
    page, more = index.page("t", "LI7", 3)
    assert ids(page) == ["LI9"] and not more
    assert ids(index.of_tenant("u")) == ["LI1"] and index.count("t") == 7 and index.count() == 8


def test_a_filtered_page_skips_what_it_does_not_keep_and_says_whether_more_follow():
    index = ListenerIndex()
    for i in range(1, 7):
        index.put("t", spec(f"LI{i}", "datasift" if i % 3 == 0 else "pusher"))
    page, more = index.page("t", None, 1, keep=lambda s: s.type == "datasift")
    assert ids(page) == ["LI3"] and more
    page, more = index.page("t", "LI3", 1, keep=lambda s: s.type == "datasift")
    assert ids(page) == ["LI6"] and not more
    assert index.page("nobody", None, 10) == ([], False)


def test_put_replaces_a_definition_in_place_and_remove_forgets_an_empty_tenant():
    index = ListenerIndex()
    index.put("t", spec("X"))
    index.put("t", spec("X", "datasift"))
    assert [s.type for s in index.of_tenant("t")] == ["datasift"] and index.count("t") == 1
    index.remove("t", "X")
    index.remove("t", "X")  # twice: nothing there, nothing happens
    assert index.get("t", "X") is None and list(index.of_tenant("t")) == [] and index.count() == 0
