# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""The HTTP client and the comparison rules every virt8ra module shares.

Why here: each module talks to the control plane's HTTP+JSON API under
/api/v1 (the same API the CLI uses), with the Python standard library only
(urllib, ssl, json), so the collection needs nothing from pip on the machine
that runs it. Errors of the API ({"error": {"code", "message"}}) become a
Virt8raError whose text carries the API's own message.

The comparison mirrors `virt8ra apply` (crates/cli/src/apply/plan.rs): a
module declares the whole resource, options left out take the API's
defaults, nested objects are compared field by field (dotted paths), lists
whole, absent and null and empty lists are the same, numbers as numbers.
The label `virt8ra.io/managed-by` (apply's marker) is not the user's: it is
left out of comparisons and kept on updates.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import ssl
import time

try:
    from urllib.parse import quote, urlencode
    from urllib.request import Request, build_opener, HTTPSHandler, HTTPHandler
    from urllib.error import HTTPError, URLError
except ImportError:  # pragma: no cover (Python 2 is not supported)
    raise

from ansible.module_utils.basic import env_fallback

MANAGED_KEY = "virt8ra.io/managed-by"

AUTH_ARGS = dict(
    url=dict(type="str", fallback=(env_fallback, ["VIRT8RA_URL"])),
    token=dict(type="str", no_log=True, fallback=(env_fallback, ["VIRT8RA_TOKEN"])),
    ca_cert=dict(type="path", fallback=(env_fallback, ["VIRT8RA_CA_CERT"])),
    timeout=dict(type="int", default=60),
)


class Virt8raError(Exception):
    """An answer of the API that is not a success, or no answer at all."""

    def __init__(self, message, status=None, code=None):
        super(Virt8raError, self).__init__(message)
        self.status = status
        self.code = code


def seg(s):
    """One path segment, percent-encoded."""
    return quote(str(s), safe="")


class Client(object):
    """A client of one control plane: base URL, bearer token, trust."""

    def __init__(self, url, token, ca_cert=None, timeout=60):
        if not url:
            raise Virt8raError("no control plane URL: pass url or set VIRT8RA_URL")
        if not token:
            raise Virt8raError("no token: pass token or set VIRT8RA_TOKEN")
        self.base = url.rstrip("/") + "/api/v1"
        self.token = token.strip()
        self.timeout = timeout
        handlers = [HTTPHandler()]
        if url.startswith("https://"):
            # The public roots of the system plus the operator's CA, as the
            # CLI trusts (README, "HTTPS").
            ctx = ssl.create_default_context()
            if ca_cert:
                try:
                    ctx.load_verify_locations(cafile=ca_cert)
                except (OSError, ssl.SSLError) as e:
                    raise Virt8raError("ca_cert %s: %s" % (ca_cert, e))
            handlers.append(HTTPSHandler(context=ctx))
        self.opener = build_opener(*handlers)

    def request(self, method, path, body=None, data=None, content_type=None, length=None):
        """Returns (status, parsed JSON or None); raises Virt8raError on a
        non-2xx answer (with the API's message) or a transport failure."""
        headers = {"Authorization": "Bearer " + self.token, "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        req = Request(self.base + path, data=data, headers=headers, method=method)
        try:
            resp = self.opener.open(req, timeout=self.timeout)
            status, text = resp.getcode(), resp.read()
        except HTTPError as e:
            status, text = e.code, e.read()
            code, message = "http_%d" % status, text.decode("utf-8", "replace").strip()
            try:
                err = json.loads(text)["error"]
                code, message = err.get("code", code), err.get("message", message)
            except (ValueError, KeyError, TypeError):
                pass
            raise Virt8raError(
                "%s %s: HTTP %d %s: %s" % (method, "/api/v1" + path, status, code, message),
                status=status,
                code=code,
            )
        except (URLError, OSError, ssl.SSLError) as e:
            raise Virt8raError("cannot reach the control plane at %s: %s" % (self.base, e))
        if not text:
            return status, None
        try:
            return status, json.loads(text)
        except ValueError:
            raise Virt8raError("%s %s: the answer is not JSON" % (method, path), status=status)

    def get(self, path):
        return self.request("GET", path)[1]

    def get_opt(self, path):
        """The resource at `path`, or None when the API answers 404."""
        try:
            return self.get(path)
        except Virt8raError as e:
            if e.status == 404:
                return None
            raise

    def post(self, path, body):
        return self.request("POST", path, body=body)[1]

    def patch(self, path, body):
        return self.request("PATCH", path, body=body)[1]

    def delete(self, path):
        return self.request("DELETE", path)[1]

    def upload(self, path, query, file_path):
        """POSTs a file's bytes as application/octet-stream (image upload)."""
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as f:
            return self.request(
                "POST",
                path + "?" + urlencode(query),
                data=f,
                content_type="application/octet-stream",
                length=size,
            )[1]

    def list_all(self, path):
        """Every item of a paged list (`items`, `next_cursor`)."""
        items, cursor = [], None
        while True:
            sep = "&" if "?" in path else "?"
            page = self.get(path + (sep + urlencode({"cursor": cursor}) if cursor else ""))
            if isinstance(page, list):
                return page
            items.extend(page.get("items") or [])
            cursor = page.get("next_cursor")
            if not cursor:
                return items


def client_from_module(module):
    p = module.params
    try:
        return Client(p.get("url"), p.get("token"), p.get("ca_cert"), p.get("timeout") or 60)
    except Virt8raError as e:
        module.fail_json(msg=str(e))


def run_module(module, run):
    """Runs `run(module, client)`; an API error fails the task with the
    API's message, status and code."""
    c = client_from_module(module)
    try:
        run(module, c)
    except Virt8raError as e:
        module.fail_json(msg=str(e), status=e.status, code=e.code)


# ------------------------------------------------------------- comparison


def prune(v):
    """Drops None, empty lists and empty objects, recursively (the API's
    serialization leaves them out; a declaration may spell them)."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            x = prune(x)
            if x is None or x == [] or x == {}:
                continue
            out[k] = x
        return out
    if isinstance(v, list):
        return [prune(x) for x in v]
    return v


def user_labels(labels):
    """Labels as a declaration sees them: without apply's marker."""
    return dict((k, v) for k, v in (labels or {}).items() if k != MANAGED_KEY)


def keep_marker(declared, live):
    """The declared labels, keeping the marker when the live resource has it."""
    out = dict(declared or {})
    if MANAGED_KEY in (live or {}):
        out[MANAGED_KEY] = live[MANAGED_KEY]
    return out


def _flatten(prefix, v, out):
    if isinstance(v, dict):
        for k, x in v.items():
            _flatten(prefix + "." + k if prefix else k, x, out)
    elif v is not None:
        out[prefix] = v


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(x, y):
    """Equal as JSON values: numbers as numbers, but a bool is no number
    (Python's True == 1 is not the API's)."""
    if isinstance(x, bool) or isinstance(y, bool):
        return type(x) is type(y) and x == y
    if _number(x) and _number(y):
        return float(x) == float(y)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return set(x) == set(y) and all(_same(x[k], y[k]) for k in x)
    return x == y


def diff(live, declared):
    """Field-by-field differences, as `virt8ra apply` computes them: a list
    of {field, from, to} sorted by field."""
    a, b = {}, {}
    _flatten("", live, a)
    _flatten("", declared, b)
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        same = (x == [] and y is None) or (y == [] and x is None) or _same(x, y)
        if not same:
            out.append({"field": k, "from": x, "to": y})
    return out


def immutable(field, fields):
    return any(field == f or field.startswith(f + ".") for f in fields)


def fixed_message(kind, name, fixed, hint):
    """The failure for changes the API cannot make in place."""
    parts = [
        "%s cannot change in place (%s -> %s)"
        % (c["field"], json.dumps(c["from"]), json.dumps(c["to"]))
        for c in fixed
    ]
    return "%s %s: %s; %s" % (kind, name, "; ".join(parts), hint)


def refuse_fixed(module, kind, name, changes, hint, recreate):
    """Fails on changes the API cannot make in place, unless the task asks
    for the resource to be recreated (then the caller deletes and creates)."""
    if not recreate:
        module.fail_json(msg=fixed_message(kind, name, changes, hint), changes=changes)


def create_and_exit(module, result, key, want, make):
    """The resource does not exist: `make()` creates it (not in check mode),
    the result says so and the module ends."""
    result["changed"] = True
    if not module.check_mode:
        result[key] = make()
    diff_result(module, result, None, want)
    module.exit_json(**result)


def diff_result(module, result, before, after):
    """Adds Ansible's before/after diff when asked for (--diff)."""
    if module._diff:
        result["diff"] = {"before": before or {}, "after": after or {}}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wait_for(what, timeout, probe, explain=None):
    """Polls `probe()` every half second until it returns something other
    than None; raises Virt8raError after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        v = probe()
        if v is not None:
            return v
        if time.time() > deadline:
            tail = (": " + explain()) if explain else ""
            raise Virt8raError("timed out after %d s waiting for %s%s" % (timeout, what, tail))
        time.sleep(0.5)
