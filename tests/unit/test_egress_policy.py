"""The egress policy without sockets: every form of an internal address is recognised, names are matched
to their provider exactly (no look-alikes), and `[server.egress]` widens only what it names."""

import ipaddress

import pytest

from listenerd.egress import EgressRefused, Policy, grpc_target, literal_address, refusal, why_internal
from listenerd.model import Egress
from listenerd.net import sanitised


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("[::1]", "::1"), ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
])
def test_every_literal_form_is_an_address(host, address):
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["login.salesforce.com", "deadbeef.example", "acme"])
def test_names_are_not_addresses(host):
    assert literal_address(host) is None


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fd12:3456::1", "unique local"),
    ("0.0.0.0", "unspecified"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"),
    ("100.64.0.1", "not a public"), ("224.0.0.1", "multicast"),
])
def test_internal_addresses_are_named(address, why):
    assert why in why_internal(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "13.108.0.1", "2606:4700::1111"])
def test_public_addresses_pass(address):
    assert why_internal(ipaddress.ip_address(address)) is None
    Policy().check_address("h", ipaddress.ip_address(address))


def test_the_provider_is_matched_by_whole_labels():
    policy = Policy()
    for good in ("login.salesforce.com", "acme.my.salesforce.com", "salesforce.com", "x.force.com"):
        policy.check_host("salesforce", good, "login-url")
    for bad in ("notsalesforce.com", "salesforce.com.attacker.example", "login.salesforce.co", "xn--salesforce.com"):
        with pytest.raises(EgressRefused, match="login-url"):
            policy.check_host("salesforce", bad, "login-url")
    with pytest.raises(EgressRefused):  # another provider's host is not this one's
        policy.check_host("salesforce", "ws-mt1.pusher.com", "login-url")


def test_config_widens_only_what_it_names():
    policy = Policy.from_settings(Egress(hosts=["Streams.Example.com."], suffixes=[".corp.example"],
                                         networks=["10.20.0.0/16"], plaintext=True))
    policy.check_url("datasift", "ws://streams.example.com/multi", "stream-url", ("wss",))
    policy.check_url("datasift", "wss://a.b.corp.example/multi", "stream-url", ("wss",))
    policy.check_url("datasift", "wss://10.20.3.4/multi", "stream-url", ("wss",))
    policy.check_address("streams.example.com", ipaddress.ip_address("10.20.9.9"))
    with pytest.raises(EgressRefused, match="10.21.0.1"):
        policy.check_address("streams.example.com", ipaddress.ip_address("10.21.0.1"))
    with pytest.raises(EgressRefused):
        policy.check_url("datasift", "wss://10.21.3.4/multi", "stream-url", ("wss",))
    with pytest.raises(EgressRefused, match="must be an wss URL"):
        Policy().check_url("datasift", "ws://stream.datasift.com/multi", "stream-url", ("wss",))


def test_a_refusal_is_found_inside_a_wrapped_connection_error():
    class Wrapped(Exception):
        def __init__(self, inner):
            self.os_error = inner
    inner = EgressRefused("egress refused: x resolves to 127.0.0.1")
    assert refusal(Wrapped(inner)) is inner and refusal(ValueError("x")) is None


def test_egress_networks_are_validated():
    with pytest.raises(ValueError, match="not an address or CIDR"):
        Egress(networks=["10.0.0.0/33"])


def test_upstream_words_are_short_and_printable():
    hostile = "<html>" + "\x1b[31m" + "A" * 5000 + "\n\r</html>"
    words = sanitised(hostile)
    assert len(words) <= 160 and "<" not in words and "\x1b" not in words and "\n" not in words


def test_a_reload_that_changes_egress_restarts_api_made_listeners_only():
    from listenerd.model import Config, PusherIntegration, load_listener
    from listenerd.supervisor import Desired, runs_stale

    listener = load_listener({"id": "LI1", "type": "pusher", "options": {"channel": "c"}}, "api")
    before, after = Config(), Config.model_validate({"server": {"egress": {"networks": ["10.0.0.0/8"]}}})
    api = Desired(listener, PusherIntegration(key="k", secret="secret-value", managed_by="api"))
    config = Desired(listener, PusherIntegration(key="k", secret="secret-value"))
    stale = runs_stale(before, after)
    assert stale(api) and not stale(config)
    assert not runs_stale(after, after)(api)


@pytest.mark.parametrize(("url", "target"), [
    ("https://api.pubsub.salesforce.com:7443", "api.pubsub.salesforce.com:7443"),
    ("https://api.pubsub.salesforce.com", "api.pubsub.salesforce.com:443"), ("http://[::1]:7443", "[::1]:7443"),
])
async def test_a_grpc_target_without_a_policy_is_the_name_grpc_resolves(url, target):
    assert await grpc_target(None, "salesforce", url, "pubsub-url", 1.0) == (target, [])


async def test_a_grpc_target_off_the_policy_is_refused_by_name_before_any_lookup():
    with pytest.raises(EgressRefused) as refused:
        await grpc_target(Policy(), "salesforce", "https://pubsub.internal.corp:7443", "pubsub-url", 1.0)
    assert refused.value.field == "pubsub-url" and "is not a salesforce host" in str(refused.value)
