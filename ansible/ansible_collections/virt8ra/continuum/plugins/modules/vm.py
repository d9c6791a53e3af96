#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""A VM, declared: created where the placement engine puts it, started or
stopped, or deleted. As in `virt8ra apply`, only the power state changes
in place; any other difference from the existing VM (size, image,
placement, user data, keys, network, ports, labels, data disks, NICs) fails
naming the field, unless `recreate` is set (delete, wait, create again:
the disk is lost)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: vm
short_description: Manage a virt8ra virtual machine
description:
  - Creates, starts, stops or deletes a VM through the control plane's API (C(/api/v1/vms));
    the placement engine picks its host within the O(placement) rules.
  - Only the power state changes in place. Any other difference from the existing VM fails
    the task naming the field, unless O(recreate=true) (the VM is deleted and created again;
    its disk is lost).
  - Options left out take the API's defaults and are compared as such; the boot disk is at
    least the image's virtual size, as the API makes it.
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment: virt8ra.continuum.auth
options:
  name:
    description: The VM's name.
    type: str
    required: true
  image:
    description: Image name or id. Required unless O(state=absent).
    type: str
  vcpus:
    description: Virtual CPUs.
    type: int
    default: 1
  memory_mib:
    description: Memory in MiB.
    type: int
    default: 256
  disk_gib:
    description: Boot disk size in GiB (default, and at least, the image's virtual size, at least 1).
    type: int
  placement:
    description:
      - Placement rules, as the API's C(PlacementConstraints) (e.g. C(site), C(provider),
        C(country), C(countries), C(deny_countries), C(jurisdictions), C(max_latency),
        C(anti_affinity), C(labels)); see docs/placement.md.
    type: dict
    default: {}
  ports:
    description: Guest TCP ports the agent forwards to a port on its host's loopback.
    type: list
    elements: int
    default: []
  nics:
    description: NICs on virtual networks, in the order the guest sees them.
    type: list
    elements: dict
    default: []
    suboptions:
      network:
        description: Network name or id.
        type: str
        required: true
      ip:
        description: The address the NIC must have (else the network's lowest free one).
        type: str
  ssh_authorized_keys:
    description: OpenSSH public key lines the guest accepts.
    type: list
    elements: str
    default: []
  user_data:
    description: Given to the guest verbatim (cloud-init NoCloud user-data).
    type: str
  network:
    description: The guest's network configuration (the API's C(NetworkConfig), cloud-init network-config v2 with C(ethernets) as a list).
    type: dict
  data_disks:
    description: Disks after the boot disk, each C(image) (a copy of an image) and/or C(size_gib).
    type: list
    elements: dict
    default: []
  labels:
    description: Free-form labels of the VM.
    type: dict
    default: {}
  state:
    description:
      - V(present) creates the VM (started) and leaves its power alone;
        V(started) and V(stopped) also set its power; V(absent) deletes it.
    type: str
    choices: [present, absent, started, stopped]
    default: present
  recreate:
    description: Delete and create again a VM whose spec differs (its disk is lost).
    type: bool
    default: false
  wait:
    description: Wait until the VM is running (V(present), V(started)), stopped (V(stopped)) or deleted (V(absent)).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait.
    type: int
    default: 300
  stop_timeout:
    description: For a stop, seconds the guest's ACPI power-down has before it is forced off (the API's default when not given).
    type: int
"""

EXAMPLES = r"""
- name: A web server that must stay in Germany, on the backend network
  virt8ra.continuum.vm:
    name: web-1
    image: debian
    memory_mib: 512
    ports: [80]
    placement: {country: DE}
    nics: [{network: backend, ip: 10.20.0.10}]

- name: Stopped
  virt8ra.continuum.vm:
    name: web-1
    image: debian
    memory_mib: 512
    ports: [80]
    placement: {country: DE}
    nics: [{network: backend, ip: 10.20.0.10}]
    state: stopped

- name: Gone (waits until it is)
  virt8ra.continuum.vm:
    name: web-1
    state: absent
"""

RETURN = r"""
vm:
  description: The VM as the API returns it (C(status) has its phase, site, provider, country, host, NIC addresses and ports).
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
    prune,
    refuse_fixed,
    run_module,
    seg,
    user_labels,
    Virt8raError,
    wait_for,
)

SPEC = ["vcpus", "memory_mib", "disk_gib", "image", "placement", "user_data",
        "ssh_authorized_keys", "network", "ports", "data_disks", "nics"]
GONE = ("deleted",)


def image_gib(c, key, cache):
    """The image's virtual size in GiB, rounded up (None if unknown)."""
    if key not in cache:
        img = c.get_opt("/images/" + seg(key)) if key else None
        cache[key] = -(-img["virtual_size_bytes"] // (1 << 30)) if img else None
    return cache[key]


def declared(c, p):
    """The spec the API would make of the declaration (disks grown to
    their images, as `virt8ra apply`'s at_least_images)."""
    cache = {}
    need = image_gib(c, p["image"], cache) or 0
    want = dict((k, p[k]) for k in SPEC)
    want["disk_gib"] = max(p["disk_gib"] or 1, need)
    disks = []
    for d in p["data_disks"] or []:
        d = dict(d)
        need = image_gib(c, d.get("image"), cache) or 0
        if need > (d.get("size_gib") or 1):
            d["size_gib"] = need
        disks.append(d)
    want["data_disks"] = disks
    want["labels"] = p["labels"] or {}
    return prune(want)


def view(vm):
    s = dict((k, vm["spec"].get(k)) for k in SPEC)
    s["labels"] = user_labels(vm.get("labels"))
    return prune(s)


def request(p):
    body = dict((k, p[k]) for k in SPEC if p[k] is not None)
    body["name"] = p["name"]
    body["labels"] = p["labels"] or {}
    body["start"] = p["state"] != "stopped"
    return prune(body)


def get(c, name):
    vm = c.get_opt("/vms/" + seg(name))
    return None if vm is None or vm["status"]["phase"] in GONE else vm


def wait_phase(module, c, vm, phases):
    p = module.params

    def probe():
        v = c.get("/vms/" + seg(vm["id"]))
        ph = v["status"]["phase"]
        if ph == "failed" and "failed" not in phases:
            raise Virt8raError("vm %s failed: %s" % (vm["name"], v["status"].get("last_error")))
        return v if ph in phases else None

    def explain():
        v = c.get("/vms/" + seg(vm["id"]))
        s = v["status"]
        return "it is %s (%s)" % (s["phase"], s.get("last_error") or s.get("placement_reason") or "-")

    return wait_for("vm %s to be %s" % (vm["name"], " or ".join(phases)), p["wait_timeout"], probe, explain)


def delete(module, c, vm):
    if vm["status"]["phase"] != "deleting":
        c.delete("/vms/" + seg(vm["id"]))
    if module.params["wait"]:
        wait_phase(module, c, vm, GONE)


def create(module, c):
    p = module.params
    vm = c.post("/vms", request(p))
    if p["wait"]:
        vm = wait_phase(module, c, vm, ("stopped",) if p["state"] == "stopped" else ("running",))
    return vm


def power(module, c, vm, result):
    """Starts or stops the VM as the state asks; returns it."""
    p = module.params
    want = {"started": "running", "stopped": "stopped"}.get(p["state"])
    if want is None or vm["power"] == want:
        return vm
    result["changed"] = True
    result["changes"].append({"field": "power", "from": vm["power"], "to": want})
    if module.check_mode:
        return vm
    body = {"action": "start" if want == "running" else "stop"}
    if want == "stopped" and p["stop_timeout"] is not None:
        body["timeout_s"] = p["stop_timeout"]
    vm = c.post("/vms/%s/actions" % seg(vm["id"]), body)
    if p["wait"]:
        vm = wait_phase(module, c, vm, (want,))
    return vm


def run(module, c):
    p = module.params
    live = get(c, p["name"])
    result = {"changed": False, "changes": []}
    if p["state"] == "absent":
        if live:
            result["changed"] = True
            if not module.check_mode:
                delete(module, c, live)
            diff_result(module, result, view(live), None)
        module.exit_json(**result)
    if live and live["status"]["phase"] == "deleting":
        module.fail_json(msg="vm %s is being deleted; run again once it is gone" % p["name"])
    want = declared(c, p)
    if live is None:
        create_and_exit(module, result, "vm", want, lambda: create(module, c))
    result["changes"] = diff(view(live), want)
    result["vm"] = live
    if result["changes"]:
        refuse_fixed(
            module, "vm", p["name"], result["changes"],
            "delete the VM first, declare it under a new name, or set recreate: true (its disk is lost)",
            p["recreate"],
        )
        result["changed"] = True
        if not module.check_mode:
            delete(module, c, live)
            if not p["wait"]:
                wait_phase(module, c, live, GONE)
            result["vm"] = create(module, c)
        diff_result(module, result, view(live), want)
        module.exit_json(**result)
    result["vm"] = power(module, c, live, result)
    after = result["changes"][-1]["to"] if result["changed"] else live["power"]
    diff_result(module, result, dict(view(live), power=live["power"]), dict(want, power=after))
    module.exit_json(**result)


def main():
    spec = dict(
        name=dict(type="str", required=True),
        image=dict(type="str"),
        vcpus=dict(type="int", default=1),
        memory_mib=dict(type="int", default=256),
        disk_gib=dict(type="int"),
        placement=dict(type="dict", default={}),
        ports=dict(type="list", elements="int", default=[]),
        nics=dict(type="list", elements="dict", default=[],
                  options=dict(network=dict(type="str", required=True), ip=dict(type="str"))),
        ssh_authorized_keys=dict(type="list", elements="str", default=[], no_log=False),
        user_data=dict(type="str"),
        network=dict(type="dict"),
        data_disks=dict(type="list", elements="dict", default=[]),
        labels=dict(type="dict", default={}),
        state=dict(type="str", choices=["present", "absent", "started", "stopped"], default="present"),
        recreate=dict(type="bool", default=False),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=300),
        stop_timeout=dict(type="int"),
    )
    spec.update(AUTH_ARGS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        required_if=[("state", s, ["image"]) for s in ("present", "started", "stopped")],
    )
    run_module(module, run)


if __name__ == "__main__":
    main()
