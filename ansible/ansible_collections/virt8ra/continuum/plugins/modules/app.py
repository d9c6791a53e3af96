#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""An app (one appliance deployed at several locations), declared. As in
`virt8ra apply`, the appliance is resolved through the API first and
compared as CATALOG/NAME@VERSION with its parameters as resolved
(defaults filled in, strings converted to the parameter's type);
locations as a set. Nothing of an app changes in place: a difference
fails naming the field, unless `recreate` is set (every replica deleted,
the app deployed again)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: app
short_description: Deploy a virt8ra appliance as an app
description:
  - Deploys an appliance of the marketplace at several locations (sites, providers or country
    codes) as one app, all or nothing, or deletes the app with every replica (C(/api/v1/apps)).
  - The appliance is resolved through the API (C(NAME), C(NAME@VERSION), C(CATALOG/NAME)...;
    without a version, the newest, so publishing a newer one makes the app differ).
  - Nothing changes in place; a difference fails naming the field, unless O(recreate=true).
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment: virt8ra.continuum.auth
options:
  name:
    description: The app's name.
    type: str
    required: true
  appliance:
    description: The appliance. Required with O(state=present).
    type: str
  locations:
    description: Each a site, a provider or an ISO country code. Required with O(state=present).
    type: list
    elements: str
    default: []
  replicas_per_location:
    description: Replicas at each location.
    type: int
    default: 1
  params:
    description: Values of the appliance's parameters (the rest take their defaults).
    type: dict
    default: {}
  ssh_authorized_keys:
    description: OpenSSH public keys every replica accepts.
    type: list
    elements: str
    default: []
  labels:
    description: Labels of the app itself.
    type: dict
    default: {}
  recreate:
    description: Delete the app and deploy it again when it differs.
    type: bool
    default: false
  state:
    description: Whether the app exists.
    type: str
    choices: [present, absent]
    default: present
  wait:
    description: Wait until every replica runs (V(present)) or the app is gone (V(absent)).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait.
    type: int
    default: 600
"""

EXAMPLES = r"""
- name: The web appliance in Spain, at provider-de and at one Polish site
  virt8ra.continuum.app:
    name: shop
    appliance: web
    locations: [es, provider-de, pl-gdansk]
    params: {greeting: Hola}
"""

RETURN = r"""
app:
  description: The app as the API returns it (status, locations, every replica with its site).
  returned: when it exists
  type: dict
changes:
  description: The fields that differ, each with C(field), C(from) and C(to).
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.virt8ra.continuum.plugins.module_utils.virt8ra import (
    AUTH_ARGS,
    create_and_exit,
    diff,
    diff_result,
    refuse_fixed,
    run_module,
    seg,
    user_labels,
    Virt8raError,
    wait_for,
)


def coerce(param, v):
    """A parameter's value as the API resolves it (its type)."""
    kind = param.get("type")
    if kind == "integer" and isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return v
    if kind == "boolean" and v in ("true", "false"):
        return v == "true"
    if kind == "string" and isinstance(v, bool):
        return "true" if v else "false"
    if kind == "string" and isinstance(v, (int, float)):
        return str(v)
    return v


def resolve(module, c):
    """(CATALOG/NAME@VERSION, resolved params) of the declared appliance."""
    p = module.params
    entry = c.get_opt("/appliances/" + seg(p["appliance"].strip()))
    if entry is None:
        module.fail_json(msg="app %s: appliance %r is not known to the control plane" % (p["name"], p["appliance"]))
    a = entry["appliance"]
    params = {}
    known = [x["name"] for x in a.get("parameters") or []]
    for k in p["params"]:
        if k not in known:
            module.fail_json(msg="app %s: appliance %s@%s has no parameter %r (it has: %s)"
                             % (p["name"], a["name"], a["version"], k, ", ".join(known) or "none"))
    for x in a.get("parameters") or []:
        if x["name"] in p["params"]:
            params[x["name"]] = coerce(x, p["params"][x["name"]])
        elif "default" in x and x["default"] is not None:
            params[x["name"]] = coerce(x, x["default"])
    return "%s/%s@%s" % (entry["catalog"], a["name"], a["version"]), params


def view(app):
    reps = [x["replicas"] for x in app.get("locations") or []]
    replicas = reps[0] if reps and all(r == reps[0] for r in reps) else reps
    return {"appliance": app["appliance"],
            "locations": sorted(x["location"].strip() for x in app.get("locations") or []),
            "replicas_per_location": replicas, "params": app.get("params") or {},
            "ssh_authorized_keys": app.get("ssh_authorized_keys") or [],
            "labels": user_labels(app.get("labels"))}


def wait_running(module, c, app):
    def probe():
        a = c.get("/apps/" + seg(app["id"]))
        if a["status"] == "failed":
            errs = ["%s: %s" % (v["name"], v.get("last_error")) for v in a["vms"] if v.get("last_error")]
            raise Virt8raError("app %s failed: %s" % (app["name"], "; ".join(errs) or "-"))
        return a if a["status"] == "running" else None

    return wait_for("app %s to run" % app["name"], module.params["wait_timeout"], probe)


def delete(module, c, app):
    if app["status"] != "deleting":
        c.delete("/apps/" + seg(app["id"]))
    if module.params["wait"]:
        wait_for("app %s to be gone" % app["name"], module.params["wait_timeout"],
                 lambda: True if c.get_opt("/apps/" + seg(app["id"])) is None else None)


def create(module, c, appliance):
    p = module.params
    body = {"name": p["name"], "appliance": appliance,
            "locations": [x.strip() for x in p["locations"]],
            "replicas_per_location": p["replicas_per_location"], "params": p["params"],
            "ssh_authorized_keys": p["ssh_authorized_keys"], "labels": p["labels"]}
    app = c.post("/apps", body)
    return wait_running(module, c, app) if p["wait"] else app


def run(module, c):
    p = module.params
    live = c.get_opt("/apps/" + seg(p["name"]))
    result = {"changed": False, "changes": []}
    if p["state"] == "absent":
        if live:
            result["changed"] = True
            if not module.check_mode:
                delete(module, c, live)
            diff_result(module, result, view(live), None)
        module.exit_json(**result)
    if live and live["status"] == "deleting":
        module.fail_json(msg="app %s is being deleted; run again once it is gone" % p["name"])
    appliance, params = resolve(module, c)
    want = {"appliance": appliance, "locations": sorted(x.strip() for x in p["locations"]),
            "replicas_per_location": p["replicas_per_location"], "params": params,
            "ssh_authorized_keys": p["ssh_authorized_keys"], "labels": p["labels"]}
    if live is None:
        create_and_exit(
            module, result, "app", want, lambda: create(module, c, appliance)
        )
    result["changes"] = diff(view(live), want)
    result["app"] = live
    if result["changes"]:
        refuse_fixed(
            module, "app", p["name"], result["changes"],
            "delete the app first, declare it under a new name, or set recreate: true",
            p["recreate"],
        )
        result["changed"] = True
        if not module.check_mode:
            delete(module, c, live)
            if not p["wait"]:
                wait_for("app %s to be gone" % p["name"], p["wait_timeout"],
                         lambda: True if c.get_opt("/apps/" + seg(live["id"])) is None else None)
            result["app"] = create(module, c, appliance)
    diff_result(module, result, view(live), want)
    module.exit_json(**result)


def main():
    spec = dict(
        name=dict(type="str", required=True),
        appliance=dict(type="str"),
        locations=dict(type="list", elements="str", default=[]),
        replicas_per_location=dict(type="int", default=1),
        params=dict(type="dict", default={}),
        ssh_authorized_keys=dict(type="list", elements="str", default=[], no_log=False),
        labels=dict(type="dict", default={}),
        recreate=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=600),
    )
    spec.update(AUTH_ARGS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        required_if=[("state", "present", ["appliance", "locations"])],
    )
    run_module(module, run)


if __name__ == "__main__":
    main()
