# -*- coding: utf-8 -*-
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of the collection's shared code: the comparison rules (the
same as `virt8ra apply`'s), the defaults a declaration is compared with,
and the HTTP client's errors against a real socket.

Run with the Python that Ansible uses, from the repository's root:
  PYTHONPATH=ansible python3 -m unittest discover -s ansible/tests/unit
(crates/virt8ra/tests/ansible.rs runs them so.)
"""

import json
import threading
import unittest
from http.server import BaseHTTPRequestHandler, HTTPServer

from ansible_collections.virt8ra.continuum.plugins.module_utils import virt8ra as u
from ansible_collections.virt8ra.continuum.plugins.modules import app, network


class Comparison(unittest.TestCase):
    def test_numbers_compare_as_numbers(self):
        self.assertEqual(u.diff({"a": 1}, {"a": 1.0}), [])
        self.assertEqual(u.diff({"a": 1}, {"a": 2}), [{"field": "a", "from": 1, "to": 2}])

    def test_absent_null_and_empty_list_are_the_same(self):
        self.assertEqual(u.diff({"a": []}, {}), [])
        self.assertEqual(u.diff({}, {"a": None}), [])
        self.assertEqual(u.diff({"a": None}, {"a": []}), [])

    def test_nested_objects_by_field_lists_whole(self):
        d = u.diff({"p": {"site": "x", "countries": ["DE"]}}, {"p": {"site": "y", "countries": ["DE", "PL"]}})
        self.assertEqual([c["field"] for c in d], ["p.countries", "p.site"])
        self.assertEqual(u.diff({"l": [1, 2]}, {"l": [2, 1]})[0]["field"], "l")

    def test_a_bool_is_not_a_number(self):
        self.assertEqual(len(u.diff({"a": True}, {"a": 1})), 1)
        self.assertEqual(len(u.diff({"a": [True]}, {"a": [1]})), 1)
        self.assertEqual(u.diff({"a": [{"x": 1}]}, {"a": [{"x": 1.0}]}), [])

    def test_prune_drops_empty_values_inside_lists_too(self):
        self.assertEqual(
            u.prune({"a": None, "b": [], "c": {}, "d": [{"ip": None, "network": "n"}], "e": 0}),
            {"d": [{"network": "n"}], "e": 0},
        )

    def test_apply_marker_is_not_the_users(self):
        live = {"x": "1", u.MANAGED_KEY: "apply"}
        self.assertEqual(u.user_labels(live), {"x": "1"})
        self.assertEqual(u.keep_marker({"y": "2"}, live), {"y": "2", u.MANAGED_KEY: "apply"})
        self.assertEqual(u.keep_marker({"y": "2"}, {}), {"y": "2"})

    def test_immutable_prefix_matches_children(self):
        self.assertTrue(u.immutable("placement.site", ["placement"]))
        self.assertFalse(u.immutable("placements", ["placement"]))


class Defaults(unittest.TestCase):
    def net(self, **kw):
        p = {"cidr": "10.20.0.0/24", "no_gateway": False, "gateway": None, "dns": [], "mtu": None,
             "nat": None, "span": None}
        p.update(kw)
        return network.declared(p)

    def test_network_defaults_are_the_apis(self):
        self.assertEqual(self.net(), {"cidr": "10.20.0.0/24", "gateway": "10.20.0.1", "dns": [],
                                      "mtu": 1390, "nat": True, "span": {}})
        n = self.net(no_gateway=True)
        self.assertEqual((n["gateway"], n["nat"]), (None, False))
        self.assertEqual(self.net(gateway="10.20.0.254")["gateway"], "10.20.0.254")

    def test_app_params_take_the_parameters_type(self):
        self.assertEqual(app.coerce({"type": "integer"}, "128"), 128)
        self.assertEqual(app.coerce({"type": "boolean"}, "true"), True)
        self.assertEqual(app.coerce({"type": "string"}, 5), "5")
        self.assertEqual(app.coerce({"type": "string"}, False), "false")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/json"):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer t0k":
            return self.answer(401, json.dumps({"error": {"code": "unauthorized", "message": "no token"}}))
        if self.path == "/api/v1/sites/nope":
            return self.answer(404, json.dumps({"error": {"code": "not_found", "message": "site 'nope' not found"}}))
        if self.path == "/api/v1/plain":
            return self.answer(502, "bad gateway", "text/plain")
        if self.path.startswith("/api/v1/vms"):
            page = {"items": [{"name": "b"}]} if "cursor=a" in self.path else {"items": [{"name": "a"}], "next_cursor": "a"}
            return self.answer(200, json.dumps(page))
        self.answer(200, json.dumps({"path": self.path}))

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        self.answer(409, json.dumps({"error": {"code": "conflict", "message": "provider 'acme' exists"}}))


class ClientAgainstASocket(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = HTTPServer(("127.0.0.1", 0), Handler)
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()
        cls.url = "http://127.0.0.1:%d" % cls.server.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def test_the_apis_message_is_in_the_error(self):
        c = u.Client(self.url, "t0k")
        with self.assertRaises(u.Virt8raError) as e:
            c.post("/providers", {"name": "acme"})
        self.assertEqual(str(e.exception), "POST /api/v1/providers: HTTP 409 conflict: provider 'acme' exists")
        self.assertEqual((e.exception.status, e.exception.code), (409, "conflict"))

    def test_a_body_that_is_not_json_is_quoted(self):
        with self.assertRaises(u.Virt8raError) as e:
            u.Client(self.url, "t0k").get("/plain")
        self.assertIn("HTTP 502 http_502: bad gateway", str(e.exception))

    def test_not_found_is_none_other_errors_raise(self):
        self.assertIsNone(u.Client(self.url, "t0k").get_opt("/sites/nope"))
        with self.assertRaises(u.Virt8raError) as e:
            u.Client(self.url, "wrong").get_opt("/sites/x")
        self.assertEqual(e.exception.status, 401)

    def test_pages_are_followed(self):
        self.assertEqual([v["name"] for v in u.Client(self.url, "t0k").list_all("/vms")], ["a", "b"])

    def test_segments_are_encoded(self):
        self.assertEqual(u.Client(self.url, "t0k").get("/x/" + u.seg("a b/c"))["path"], "/api/v1/x/a%20b%2Fc")

    def test_missing_settings_say_what_to_set(self):
        with self.assertRaises(u.Virt8raError) as e:
            u.Client(None, "t")
        self.assertIn("VIRT8RA_URL", str(e.exception))
        with self.assertRaises(u.Virt8raError) as e:
            u.Client(self.url, "")
        self.assertIn("VIRT8RA_TOKEN", str(e.exception))

    def test_nothing_listening_says_so(self):
        port = self.server.server_address[1]
        s = HTTPServer(("127.0.0.1", 0), Handler)
        dead = s.server_address[1]
        s.server_close()
        self.assertNotEqual(port, dead)
        with self.assertRaises(u.Virt8raError) as e:
            u.Client("http://127.0.0.1:%d" % dead, "t0k").get("/sites")
        self.assertIn("cannot reach the control plane", str(e.exception))


if __name__ == "__main__":
    unittest.main()
