#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""A disk image, declared: imported from a local file (uploaded) or from a
URL the control plane fetches, compared by content (sha256 of the file as
imported) and architecture, as `virt8ra apply` does. An image has nothing
that changes in place: other content fails unless `recreate` is set, and
then the API itself refuses while VMs use the image."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: image
short_description: Import or delete a virt8ra disk image
description:
  - Imports a disk image (qcow2, raw, VMDK, VHD or VHDX; converted to qcow2) into the
    control plane's content-addressed image store, from a file the module reads (O(src),
    on the machine that runs the module, the controller with a local connection)
    or from an http(s) URL the control plane downloads (O(image_url)).
  - An image exists when an image of that name does; it is compared by the sha256 of the
    file as imported (for O(src) always; for O(image_url) only when O(sha256) is given) and
    by architecture. Other content fails the task, unless O(recreate=true), which deletes the
    image and imports it again (refused by the API while VMs use it).
version_added: 0.1.0
author: virt8ra contributors
extends_documentation_fragment: virt8ra.continuum.auth
options:
  name:
    description: The image's name.
    type: str
    required: true
  src:
    description:
      - Path of the disk image file to upload, on the machine that runs the module. A relative
        path is relative to the directory Ansible runs in, not to the playbook (use C({{ playbook_dir }})).
    type: path
  image_url:
    description: An http(s) URL the control plane downloads the image from.
    type: str
  sha256:
    description:
      - The sha256 of the file (lowercase hex). With O(image_url) the control plane refuses a
        download with another sum; with O(src) the file must have this sum.
    type: str
  arch:
    description: The guest architecture.
    type: str
    default: x86_64
  version:
    description: A version tag, e.g. C(1.0.0) (set at import).
    type: str
  labels:
    description: Labels (set at import; upload only).
    type: dict
    default: {}
  recreate:
    description: Delete and import again an image whose content or architecture differs.
    type: bool
    default: false
  state:
    description: Whether the image exists. Deleting one that VMs use fails with the API's message.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: Upload a disk from the controller
  virt8ra.continuum.image:
    name: debian
    src: "{{ playbook_dir }}/disks/debian.qcow2"

- name: Let the control plane fetch one
  virt8ra.continuum.image:
    name: cirros
    image_url: https://example.org/cirros.qcow2
    sha256: 0123abcd...
"""

RETURN = r"""
image:
  description: The image as the API returns it.
  returned: when it exists
  type: dict
changes:
  description: The fields that differ, each with C(field), C(from) and C(to).
  returned: always
  type: list
  elements: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.virt8ra.continuum.plugins.module_utils.virt8ra import (
    AUTH_ARGS,
    create_and_exit,
    diff,
    diff_result,
    refuse_fixed,
    run_module,
    seg,
    sha256_file,
)


def view(i):
    # The sum of the file as imported; the stored copy differs when the
    # import converted it.
    return {"sha256": i.get("source_sha256") or i.get("sha256"), "arch": i.get("arch")}


def create(module, c):
    p = module.params
    if p["src"]:
        query = {"name": p["name"], "arch": p["arch"]}
        if p["version"]:
            query["version"] = p["version"]
        if p["labels"]:
            query["labels"] = ",".join("%s=%s" % kv for kv in sorted(p["labels"].items()))
        return c.upload("/images", query, p["src"])
    body = {"name": p["name"], "url": p["image_url"], "arch": p["arch"]}
    for k in ["sha256", "version"]:
        if p[k]:
            body[k] = p[k]
    return c.post("/images/import", body)


def run(module, c):
    p = module.params
    live = c.get_opt("/images/" + seg(p["name"]))
    result = {"changed": False, "changes": []}
    if p["state"] == "absent":
        if live:
            result["changed"] = True
            if not module.check_mode:
                c.delete("/images/" + seg(live["id"]))
            diff_result(module, result, view(live), None)
        module.exit_json(**result)
    want = {"sha256": p["sha256"], "arch": p["arch"]}
    if p["src"]:
        if not os.path.isfile(p["src"]):
            module.fail_json(msg="image %s: src %s is not a file" % (p["name"], p["src"]))
        have = sha256_file(p["src"])
        if p["sha256"] and p["sha256"].lower() != have:
            module.fail_json(msg="image %s: %s has sha256 %s, not %s" % (p["name"], p["src"], have, p["sha256"]))
        want["sha256"] = have
    if live is None:
        create_and_exit(module, result, "image", want, lambda: create(module, c))
    # Without a declared sum, a URL's content is not known here.
    cmp = dict(want) if want["sha256"] else {"arch": want["arch"]}
    result["changes"] = diff(dict((k, view(live)[k]) for k in cmp), cmp)
    result["image"] = live
    if result["changes"]:
        refuse_fixed(
            module, "image", p["name"], result["changes"],
            "delete the image first, declare it under a new name, or set recreate: true",
            p["recreate"],
        )
        result["changed"] = True
        if not module.check_mode:
            c.delete("/images/" + seg(live["id"]))
            result["image"] = create(module, c)
    diff_result(module, result, view(live), want)
    module.exit_json(**result)


def main():
    spec = dict(
        name=dict(type="str", required=True),
        src=dict(type="path"),
        image_url=dict(type="str"),
        sha256=dict(type="str"),
        arch=dict(type="str", default="x86_64"),
        version=dict(type="str"),
        labels=dict(type="dict", default={}),
        recreate=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    spec.update(AUTH_ARGS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        mutually_exclusive=[("src", "image_url")],
        required_if=[("state", "present", ["src", "image_url"], True)],
    )
    run_module(module, run)


if __name__ == "__main__":
    main()
