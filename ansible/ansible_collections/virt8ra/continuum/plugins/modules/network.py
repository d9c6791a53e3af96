#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""A virtual network, declared. Networks are immutable in the API, so a
declaration that differs from the existing network (compared with the
control plane's defaults filled in: gateway the subnet's first address,
MTU 1390, NAT when there is a gateway, as `virt8ra apply` compares) fails
naming the field, unless `recreate` is set."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: network
short_description: Manage a virt8ra virtual network
description:
  - Creates or deletes a virtual network (a private layer 2 segment with one IPv4 subnet,
    IPAM in the control plane) through the API (C(/api/v1/networks)).
  - Networks cannot change in place; a differing declaration fails naming the field, unless
    O(recreate=true) (delete and create again; the API refuses while VMs have NICs on it).
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment: virt8ra.continuum.auth
options:
  name:
    description: The network's name.
    type: str
    required: true
  cidr:
    description: The subnet, e.g. C(10.20.0.0/24) (no host bits; /8 to /30). Required with O(state=present).
    type: str
  gateway:
    description: The gateway's address (default the subnet's first address).
    type: str
  no_gateway:
    description: A plain layer 2 segment (no gateway, DHCP or NAT).
    type: bool
    default: false
  dns:
    description: DNS servers given to guests by DHCP.
    type: list
    elements: str
    default: []
  mtu:
    description: The MTU (default 1390).
    type: int
  nat:
    description: Outbound NAT through each host's address (default true with a gateway).
    type: bool
  span:
    description: Where the network may reach; empty lists allow everything.
    type: dict
    suboptions:
      countries:
        description: ISO country codes.
        type: list
        elements: str
      providers:
        description: Provider names.
        type: list
        elements: str
      sites:
        description: Site names.
        type: list
        elements: str
  recreate:
    description: Delete and create again a network whose definition differs.
    type: bool
    default: false
  state:
    description: Whether the network exists. Deleting one with NICs on it fails with the API's message naming the VMs.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: A network in Spain and Germany
  virt8ra.continuum.network:
    name: backend
    cidr: 10.20.0.0/24
    span: {countries: [ES, DE]}
"""

RETURN = r"""
network:
  description: The network as the API returns it.
  returned: when it exists
  type: dict
changes:
  description: The fields that differ, each with C(field), C(from) and C(to).
  returned: always
  type: list
  elements: dict
"""

import ipaddress

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_text
from ansible_collections.virt8ra.continuum.plugins.module_utils.virt8ra import (
    AUTH_ARGS,
    create_and_exit,
    diff,
    diff_result,
    prune,
    refuse_fixed,
    run_module,
    seg,
)

MTU = 1390


def declared(p):
    """The network the declaration makes, with the API's defaults."""
    try:
        net = ipaddress.IPv4Network(to_text(p["cidr"]).strip())
        cidr = str(net)
    except ValueError:
        net, cidr = None, p["cidr"]  # the API says what is wrong
    if p["no_gateway"]:
        gw = None
    elif p["gateway"]:
        gw = p["gateway"]
    else:
        gw = str(net.network_address + 1) if net else None
    nat = p["nat"] if p["nat"] is not None else gw is not None
    return {"cidr": cidr, "gateway": gw, "dns": p["dns"] or [], "mtu": p["mtu"] or MTU,
            "nat": nat, "span": prune(p["span"] or {})}


def view(n):
    return {"cidr": n.get("cidr"), "gateway": n.get("gateway"), "dns": n.get("dns") or [],
            "mtu": n.get("mtu"), "nat": n.get("nat"), "span": prune(n.get("span") or {})}


def create(module, c):
    p = module.params
    body = {"name": p["name"], "cidr": p["cidr"], "no_gateway": p["no_gateway"], "dns": p["dns"] or []}
    for k in ["gateway", "mtu", "nat"]:
        if p[k] is not None:
            body[k] = p[k]
    if p["span"]:
        body["span"] = prune(p["span"])
    return c.post("/networks", body)


def run(module, c):
    p = module.params
    live = c.get_opt("/networks/" + seg(p["name"]))
    result = {"changed": False, "changes": []}
    if p["state"] == "absent":
        if live:
            result["changed"] = True
            if not module.check_mode:
                c.delete("/networks/" + seg(live["id"]))
            diff_result(module, result, view(live), None)
        module.exit_json(**result)
    want = declared(p)
    if live is None:
        create_and_exit(module, result, "network", want, lambda: create(module, c))
    result["changes"] = diff(view(live), want)
    result["network"] = live
    if result["changes"]:
        refuse_fixed(
            module, "network", p["name"], result["changes"],
            "networks are immutable: delete it first, declare it under a new name, or set recreate: true",
            p["recreate"],
        )
        result["changed"] = True
        if not module.check_mode:
            c.delete("/networks/" + seg(live["id"]))
            result["network"] = create(module, c)
    diff_result(module, result, view(live), want)
    module.exit_json(**result)


def main():
    lst = dict(type="list", elements="str")
    spec = dict(
        name=dict(type="str", required=True),
        cidr=dict(type="str"),
        gateway=dict(type="str"),
        no_gateway=dict(type="bool", default=False),
        dns=dict(type="list", elements="str", default=[]),
        mtu=dict(type="int"),
        nat=dict(type="bool"),
        span=dict(type="dict", options=dict(countries=lst, providers=lst, sites=lst)),
        recreate=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    spec.update(AUTH_ARGS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        required_if=[("state", "present", ["cidr"])],
    )
    run_module(module, run)


if __name__ == "__main__":
    main()
