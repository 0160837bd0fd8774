from __future__ import annotations

from pathlib import Path

import pytest

from keyveil.catalog import ConfigError, load_catalog
from keyveil.detect import Finding
from keyveil.policy import load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(ROOT / "config" / "endpoints.toml")


def finding(cat: str, route: str | None = None) -> Finding:
    return Finding("post", route, {cat: 3}, {"name"}, None, [], 0)


class TestPolicy:
    def test_bundled_defaults(self, catalog):
        pol = load_policy(ROOT / "config" / "policy.toml")
        assert pol.mode == "enforce"
        banzai, graphql = catalog.endpoint("banzai"), catalog.endpoint("graphql")
        assert pol.decide("facebook", banzai, "www.facebook.com", [finding("keystroke")]).flow == "drop"
        # a telemetry endpoint is dropped whole even when it carries nothing behavioral
        assert pol.decide("facebook", banzai, "www.facebook.com", [finding("other")]).flow == "drop"
        plan = pol.decide("facebook", graphql, "www.facebook.com", [finding("keystroke"), finding("other")])
        assert plan.flow == "strip" and plan.actions == ["strip", "pass"]
        assert pol.decide("facebook", graphql, "www.facebook.com", [finding("other")]).flow == "pass"
        assert pol.decide("facebook", None, "www.facebook.com", [finding("click")]).flow == "strip"

    def test_functional_never_dropped_by_category(self, catalog):
        pol = parse_policy('[categories]\nkeystroke = "drop"\n')
        plan = pol.decide("facebook", catalog.endpoint("graphql"), "www.facebook.com", [finding("keystroke")])
        assert plan.flow == "strip" and plan.actions == ["strip"]

    def test_rules_first_match_wins(self, catalog):
        pol = parse_policy(
            '[[rule]]\nendpoint = "banzai"\ncategory = "activity"\naction = "pass"\n'
            '[[rule]]\nendpoint = "banzai"\naction = "strip"\n'
            '[[rule]]\napp = "pixel"\naction = "pass"\n'
        )
        banzai = catalog.endpoint("banzai")
        plan = pol.decide("facebook", banzai, "www.facebook.com", [finding("keystroke"), finding("activity")])
        assert plan.flow == "strip" and plan.actions == ["strip", "pass"]
        assert pol.decide("pixel", catalog.endpoint("pixel"), "www.facebook.com", [finding("click")]).flow == "pass"

    def test_route_rule(self, catalog):
        pol = parse_policy('[[rule]]\nroute = "falco:*mouseover*"\naction = "rewrite"\n[defaults]\ntelemetry = "strip"\n')
        plan = pol.decide("facebook", catalog.endpoint("banzai"), "www.facebook.com",
                          [finding("pointer", "falco:x_coreinteractionmouseover_augl"), finding("keystroke", "falco:k")])
        assert plan.actions == ["rewrite", "strip"]

    def test_allowlist(self, catalog):
        pol = parse_policy('[allowlist]\nhosts = ["business.facebook.com"]\napps = ["threads"]\n')
        assert pol.decide("facebook", catalog.endpoint("banzai"), "business.facebook.com", [finding("keystroke")]).flow == "allowed"
        assert pol.decide("threads", catalog.endpoint("banzai"), "www.threads.net", []).flow == "allowed"
        assert pol.decide("facebook", catalog.endpoint("banzai"), "www.facebook.com", []).flow == "drop"

    def test_uncataloged_pass(self):
        pol = parse_policy('[defaults]\nuncataloged = "pass"\n')
        assert pol.decide("facebook", None, "www.facebook.com", [finding("keystroke")]).flow == "pass"

    @pytest.mark.parametrize(
        "text,needle",
        [
            ('mode = "loud"', "mode"),
            ('[categories]\nkeystroke = "burn"', "keystroke"),
            ('[categories]\nsmell = "drop"', "smell"),
            ('[[rule]]\naction = "drop"\ncolour = "red"', "colour"),
            ("[[rule]]\napp = 'x'", "action"),
            ("[defaults\n", "line 1"),
        ],
    )
    def test_errors(self, text, needle):
        with pytest.raises(ConfigError, match=needle) as e:
            parse_policy(text, "policy.toml")
        assert "policy.toml" in str(e.value) and "line " in str(e.value)
