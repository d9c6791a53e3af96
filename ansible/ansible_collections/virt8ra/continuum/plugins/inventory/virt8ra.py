# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""A dynamic inventory of a control plane's VMs.

Why: playbooks that configure guests need to know which VMs exist and
where they run; the control plane knows (GET /api/v1/vms). Each VM is a
host, grouped by the site, provider and country it runs in (what
placement rules are written in), with its addresses and forwarded ports
as host variables.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: virt8ra
short_description: The VMs of a virt8ra control plane
description:
  - Every VM of the control plane (not deleted) is a host named after the VM, in the groups
    C(site_<site>), C(provider_<provider>) and C(country_<CC>) of where it runs (characters
    other than letters, digits and C(_) become C(_), as in C(site_de_frankfurt)), in C(phase_<phase>),
    and all in C(virt8ra).
  - Host variables C(virt8ra_id), C(virt8ra_phase), C(virt8ra_power), C(virt8ra_site),
    C(virt8ra_provider), C(virt8ra_country), C(virt8ra_host) (the host that runs it),
    C(virt8ra_image), C(virt8ra_labels), C(virt8ra_nics) (network, ip, prefix, mac),
    C(virt8ra_ips) and C(virt8ra_ports) (guest port and the C(127.0.0.1:PORT) it is forwarded
    to on its host); C(ansible_host) is the first NIC's address when the VM has NICs.
  - The file must end in C(virt8ra.yml) or C(virt8ra.yaml).
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment:
  - constructed
options:
  plugin:
    description: The name of this plugin.
    required: true
    type: str
    choices: [virt8ra.continuum.virt8ra]
  url:
    description: The control plane's base URL.
    type: str
    env:
      - name: VIRT8RA_URL
  token:
    description: A bearer token of the control plane.
    type: str
    env:
      - name: VIRT8RA_TOKEN
  ca_cert:
    description: A PEM file of the CA that signed the control plane's certificate (HTTPS).
    type: path
    env:
      - name: VIRT8RA_CA_CERT
  timeout:
    description: Seconds to wait for one answer of the API.
    type: int
    default: 60
  filters:
    description: Only VMs that match, as the API's list filters (C(site), C(provider), C(country), C(phase)).
    type: dict
    default: {}
  set_ansible_host:
    description: Set C(ansible_host) to the VM's first NIC address.
    type: bool
    default: true
"""

EXAMPLES = r"""
# inventory.virt8ra.yml
plugin: virt8ra.continuum.virt8ra
url: https://cp.example:8480        # or VIRT8RA_URL
filters: {country: DE}
keyed_groups:
  - key: virt8ra_labels.role | default('none')
    prefix: role
"""

import re

from ansible.errors import AnsibleError
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable
from ansible.module_utils.six.moves.urllib.parse import urlencode
from ansible_collections.virt8ra.continuum.plugins.module_utils.virt8ra import (
    Client,
    Virt8raError,
)


def group_name(prefix, value):
    return prefix + "_" + re.sub(r"[^A-Za-z0-9_]", "_", str(value))


def host_vars(vm):
    s = vm.get("status") or {}
    nics = [dict((k, n.get(k)) for k in ("network", "ip", "prefix", "mac")) for n in s.get("nics") or []]
    return {
        "virt8ra_id": vm["id"],
        "virt8ra_phase": s.get("phase"),
        "virt8ra_power": vm.get("power"),
        "virt8ra_site": s.get("site"),
        "virt8ra_provider": s.get("provider"),
        "virt8ra_country": s.get("country"),
        "virt8ra_host": s.get("host"),
        "virt8ra_image": (vm.get("spec") or {}).get("image"),
        "virt8ra_labels": vm.get("labels") or {},
        "virt8ra_nics": nics,
        "virt8ra_ips": [n["ip"] for n in nics if n.get("ip")],
        "virt8ra_ports": s.get("ports") or [],
    }


class InventoryModule(BaseInventoryPlugin, Constructable):
    NAME = "virt8ra.continuum.virt8ra"

    def verify_file(self, path):
        return super(InventoryModule, self).verify_file(path) and path.endswith(("virt8ra.yml", "virt8ra.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super(InventoryModule, self).parse(inventory, loader, path, cache)
        self._read_config_data(path)
        try:
            c = Client(self.get_option("url"), self.get_option("token"),
                       self.get_option("ca_cert"), self.get_option("timeout"))
            query = urlencode(sorted((self.get_option("filters") or {}).items()))
            vms = c.list_all("/vms" + ("?" + query if query else ""))
        except Virt8raError as e:
            raise AnsibleError("virt8ra inventory: %s" % e)
        strict = self.get_option("strict")
        self.inventory.add_group("virt8ra")
        for vm in vms:
            hv = host_vars(vm)
            if hv["virt8ra_phase"] == "deleted":
                continue
            name = vm["name"]
            self.inventory.add_host(name, group="virt8ra")
            for k, v in hv.items():
                self.inventory.set_variable(name, k, v)
            if self.get_option("set_ansible_host") and hv["virt8ra_ips"]:
                self.inventory.set_variable(name, "ansible_host", hv["virt8ra_ips"][0])
            for prefix, key in (("site", "virt8ra_site"), ("provider", "virt8ra_provider"),
                                ("country", "virt8ra_country"), ("phase", "virt8ra_phase")):
                if hv[key]:
                    g = self.inventory.add_group(group_name(prefix, hv[key]))
                    self.inventory.add_child(g, name)
            self._set_composite_vars(self.get_option("compose"), hv, name, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hv, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hv, name, strict=strict)
