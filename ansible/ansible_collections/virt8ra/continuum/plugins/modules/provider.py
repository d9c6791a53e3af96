#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""A provider of the continuum, declared: created, updated in place
(country, jurisdiction, labels: what the API's PATCH changes) or deleted."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: provider
short_description: Manage a virt8ra provider
description:
  - Creates, updates or deletes a provider (a cloud or edge operator that owns sites)
    through the control plane's API (C(/api/v1/providers)).
  - Country, jurisdiction and labels change in place.
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment: virt8ra.continuum.auth
options:
  name:
    description: The provider's name (1-63 lowercase letters, digits and C(-)).
    type: str
    required: true
  country:
    description: ISO 3166-1 alpha-2 code of the country where the provider is incorporated. Required with O(state=present).
    type: str
  jurisdiction:
    description: Legal jurisdiction, e.g. C(EU), C(EEA), C(CH), C(US).
    type: str
    default: EU
  labels:
    description: Free-form labels (replace all of the provider's labels).
    type: dict
    default: {}
  state:
    description: Whether the provider exists. Deleting one that still has sites fails with the API's message.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: A provider in Germany
  virt8ra.continuum.provider:
    name: acme
    country: DE
    labels: {tier: gold}

- name: Gone
  virt8ra.continuum.provider:
    name: acme
    state: absent
"""

RETURN = r"""
provider:
  description: The provider as the API returns it (absent after a deletion).
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
    keep_marker,
    run_module,
    seg,
    user_labels,
)


def view(p):
    return {"country": p["country"], "jurisdiction": p["jurisdiction"], "labels": user_labels(p.get("labels"))}


def run(module, c):
    p = module.params
    live = c.get_opt("/providers/" + seg(p["name"]))
    result = {"changed": False, "changes": []}
    if p["state"] == "absent":
        if live:
            result["changed"] = True
            if not module.check_mode:
                c.delete("/providers/" + seg(live["id"]))
            diff_result(module, result, view(live), None)
        module.exit_json(**result)
    want = {"country": p["country"], "jurisdiction": p["jurisdiction"], "labels": p["labels"] or {}}
    if live is None:
        result["changed"] = True
        if not module.check_mode:
            body = dict(want, name=p["name"])
            result["provider"] = c.post("/providers", body)
        diff_result(module, result, None, want)
        module.exit_json(**result)
    result["changes"] = diff(view(live), want)
    result["provider"] = live
    if result["changes"]:
        result["changed"] = True
        if not module.check_mode:
            body = dict(want, labels=keep_marker(want["labels"], live.get("labels")))
            result["provider"] = c.patch("/providers/" + seg(live["id"]), body)
    diff_result(module, result, view(live), want)
    module.exit_json(**result)


def main():
    spec = dict(
        name=dict(type="str", required=True),
        country=dict(type="str"),
        jurisdiction=dict(type="str", default="EU"),
        labels=dict(type="dict", default={}),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    spec.update(AUTH_ARGS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        required_if=[("state", "present", ["country"])],
    )
    run_module(module, run)


if __name__ == "__main__":
    main()
