from pathlib import Path

import pytest

from keyveil.catalog import ConfigError, load_catalog, parse_catalog

CONFIG = Path(__file__).resolve().parents[1] / "config"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(CONFIG / "endpoints.toml")


class TestCatalog:
    @pytest.mark.parametrize(
        "host,path,method,endpoint,app",
        [
            ("www.facebook.com", "/ajax/bz", "POST", "banzai", "facebook"),
            ("web.facebook.com", "/ajax/bnzai?__a=1", "POST", "banzai", "facebook"),
            ("www.messenger.com", "/ajax/bnzai", "POST", "banzai", "messenger"),
            ("www.instagram.com", "/ajax/bz", "POST", "banzai", "instagram"),
            ("www.threads.net", "/ajax/bz", "POST", "banzai", "threads"),
            ("www.facebook.com", "/ajax/qm/", "POST", "ajax_logging", "facebook"),
            ("www.facebook.com", "/ajax/video/logging/", "POST", "ajax_logging", "facebook"),
            ("www.facebook.com", "/ajax/mercury/log.php", "POST", "ajax_logging", "facebook"),
            ("www.facebook.com", "/ajax/accessibilitylogging", "POST", "accessibility_logging", "facebook"),
            ("graph.facebook.com", "/logging_client_events", "POST", "graph_logging", "facebook"),
            ("b-graph.facebook.com", "/logging_client_events", "POST", "graph_logging", "facebook"),
            ("graph.instagram.com", "/pigeon_nest", "POST", "graph_logging", "instagram"),
            ("i.instagram.com", "/logging/falco", "POST", "falco", "instagram"),
            ("www.facebook.com", "/tr/", "GET", "pixel", "pixel"),
            ("pixel.facebook.com", "/tr", "POST", "pixel", "pixel"),
            ("www.facebook.com", "/api/graphql/", "POST", "graphql", "facebook"),
            ("www.instagram.com", "/api/v1/direct_v2/threads/broadcast/text/", "POST", "instagram_api", "instagram"),
            ("gateway.facebook.com", "/ws/realtime", "GET", "falco_ws", "facebook"),
            ("web.whatsapp.com", "/wam", "POST", "whatsapp_wam", "whatsapp"),
        ],
    )
    def test_seeded_endpoints(self, catalog, host, path, method, endpoint, app):
        m = catalog.match(host, path, method)
        assert m is not None and m.endpoint is not None
        assert (m.endpoint.name, m.app) == (endpoint, app)

    def test_kinds(self, catalog):
        assert catalog.endpoint("banzai").droppable
        assert not catalog.endpoint("graphql").droppable

    @pytest.mark.parametrize("host", ["example.org", "notfacebook.com", "facebook.com.evil.org", "localhost", ""])
    def test_non_meta_is_none(self, catalog, host):
        assert catalog.match(host, "/ajax/bz", "POST") is None

    def test_uncataloged_meta_path(self, catalog):
        m = catalog.match("www.facebook.com", "/photo.php", "GET")
        assert m is not None and m.endpoint is None and m.app == "facebook"

    def test_method_filter(self, catalog):
        assert catalog.match("www.facebook.com", "/ajax/bz", "GET").endpoint is None

    def test_intercept_regex(self, catalog):
        import re

        rx = re.compile(catalog.intercept_regex())
        assert rx.search("www.facebook.com") and rx.search("graph.instagram.com:443")
        assert not rx.search("example.org") and not rx.search("facebook.com.evil.org")

    def test_new_endpoint_is_data(self):
        cat = parse_catalog(
            '[apps]\n"facebook.com" = "facebook"\n[[endpoint]]\nname = "new_logger"\nhosts = ["facebook.com"]\n'
            'path_globs = ["/ajax/new_*"]\n'
        )
        assert cat.match("www.facebook.com", "/ajax/new_thing", "POST").endpoint.name == "new_logger"

    @pytest.mark.parametrize(
        "text,needle",
        [
            ("[[endpoint]]\nname='x'\nhosts=['a.com']\npaths=['/']\nkind='bogus'\n", "kind"),
            ("[[endpoint]]\nname='x'\nhosts=[]\npaths=['/']\n", "hosts"),
            ("[[endpoint]]\nname='x'\nhosts=['a.com']\n", "paths"),
            ("[[endpoint]\nname='x'", "line 1"),
        ],
    )
    def test_errors_name_the_problem(self, text, needle):
        with pytest.raises(ConfigError, match=needle) as e:
            parse_catalog(text, source="endpoints.toml")
        assert "endpoints.toml" in str(e.value) and "line 1" in str(e.value)


def test_media_cdns_are_not_intercepted(catalog):
    """Photos and video never carry telemetry: their hosts stay outside the interception scope."""
    import re

    rx = re.compile(catalog.intercept_regex())
    for host in ("scontent.xx.fbcdn.net", "scontent.cdninstagram.com", "mmg.whatsapp.net"):
        assert catalog.match(host, "/v/t39.jpg", "GET") is None and not rx.search(host)
