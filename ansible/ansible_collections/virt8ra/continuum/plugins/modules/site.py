#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""A site of a provider, declared: created, updated in place (city,
coordinates, tier, facts, labels), or deleted. Its provider and country
cannot change (the API refuses it), so a declaration that changes them
fails and says so."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: site
short_description: Manage a virt8ra site
description:
  - Creates, updates or deletes a site (a core data centre or an edge site of a provider)
    through the control plane's API (C(/api/v1/sites)).
  - City, coordinates, tier, facts and labels change in place; the provider and the
    country cannot (the task fails naming the field; delete the site first, or use a new name).
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment: virt8ra.continuum.auth
options:
  name:
    description: The site's name (1-63 lowercase letters, digits and C(-)).
    type: str
    required: true
  provider:
    description: Name of the provider that runs the site. Required with O(state=present).
    type: str
  country:
    description: ISO 3166-1 alpha-2 code of the country the site is in. Required with O(state=present).
    type: str
  city:
    description: The city. Required with O(state=present).
    type: str
  latitude:
    description: Latitude in degrees. Required with O(state=present).
    type: float
  longitude:
    description: Longitude in degrees. Required with O(state=present).
    type: float
  tier:
    description: A core data centre or an edge site.
    type: str
    choices: [core, edge]
    default: core
  facts:
    description: Facts that placement weighs (all optional).
    type: dict
    suboptions:
      grid_gco2_per_kwh:
        description: Grid carbon intensity in gCO2eq/kWh.
        type: float
      pue:
        description: Power usage effectiveness (>= 1.0).
        type: float
      price_vcpu_hour:
        description: Price per vCPU-hour, in EUR.
        type: float
      price_gib_hour:
        description: Price per GiB of memory per hour, in EUR.
        type: float
      access_latency_ms:
        description: Round-trip time from the site's edge router to its hosts, in ms.
        type: float
  labels:
    description: Free-form labels that placement rules select on (replace all of the site's labels).
    type: dict
    default: {}
  state:
    description: Whether the site exists. Deleting one that still has hosts fails with the API's message.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: A core site in Frankfurt
  virt8ra.continuum.site:
    name: de-frankfurt
    provider: acme
    country: DE
    city: Frankfurt
    latitude: 50.11
    longitude: 8.68
    facts: {pue: 1.2}
"""

RETURN = r"""
site:
  description: The site as the API returns it.
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
    diff,
    diff_result,
    fixed_message,
    immutable,
    keep_marker,
    prune,
    run_module,
    seg,
    user_labels,
)

FIELDS = ["provider", "country", "city", "latitude", "longitude", "tier", "facts"]
IMMUTABLE = ["provider", "country"]


def view(s):
    v = dict((k, s.get(k)) for k in FIELDS)
    v["facts"] = prune(s.get("facts") or {})
    v["labels"] = user_labels(s.get("labels"))
    return v


def run(module, c):
    p = module.params
    live = c.get_opt("/sites/" + seg(p["name"]))
    result = {"changed": False, "changes": []}
    if p["state"] == "absent":
        if live:
            result["changed"] = True
            if not module.check_mode:
                c.delete("/sites/" + seg(live["id"]))
            diff_result(module, result, view(live), None)
        module.exit_json(**result)
    want = dict((k, p[k]) for k in FIELDS)
    want["facts"] = prune(p["facts"] or {})
    want["labels"] = p["labels"] or {}
    if live is None:
        result["changed"] = True
        if not module.check_mode:
            result["site"] = c.post("/sites", dict(want, name=p["name"]))
        diff_result(module, result, None, want)
        module.exit_json(**result)
    result["changes"] = diff(view(live), want)
    result["site"] = live
    fixed = [x for x in result["changes"] if immutable(x["field"], IMMUTABLE)]
    if fixed:
        module.fail_json(
            msg=fixed_message("site", p["name"], fixed, "delete the site first or declare it under a new name"),
            changes=result["changes"],
        )
    if result["changes"]:
        result["changed"] = True
        if not module.check_mode:
            body = dict((k, want[k]) for k in ["city", "latitude", "longitude", "tier", "facts"])
            body["labels"] = keep_marker(want["labels"], live.get("labels"))
            result["site"] = c.patch("/sites/" + seg(live["id"]), body)
    diff_result(module, result, view(live), want)
    module.exit_json(**result)


def main():
    facts = dict(
        (k, dict(type="float"))
        for k in ["grid_gco2_per_kwh", "pue", "price_vcpu_hour", "price_gib_hour", "access_latency_ms"]
    )
    spec = dict(
        name=dict(type="str", required=True),
        provider=dict(type="str"),
        country=dict(type="str"),
        city=dict(type="str"),
        latitude=dict(type="float"),
        longitude=dict(type="float"),
        tier=dict(type="str", choices=["core", "edge"], default="core"),
        facts=dict(type="dict", options=facts),
        labels=dict(type="dict", default={}),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    spec.update(AUTH_ARGS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        required_if=[("state", "present", ["provider", "country", "city", "latitude", "longitude"])],
    )
    run_module(module, run)


if __name__ == "__main__":
    main()
