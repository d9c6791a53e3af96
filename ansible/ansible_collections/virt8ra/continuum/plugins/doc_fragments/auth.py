# -*- coding: utf-8 -*-
# Copyright: virt8ra contributors
# SPDX-License-Identifier: Apache-2.0
"""The connection options every virt8ra module and the inventory take."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  url:
    description:
      - The control plane's base URL, e.g. C(https://cp.example:8480) (without C(/api/v1)).
      - Taken from the environment variable E(VIRT8RA_URL) when not given.
    type: str
  token:
    description:
      - A bearer token of the control plane (the admin token).
      - Taken from the environment variable E(VIRT8RA_TOKEN) when not given.
    type: str
  ca_cert:
    description:
      - A PEM file of the CA that signed the control plane's certificate, trusted
        besides the system's public roots (HTTPS only).
      - Taken from the environment variable E(VIRT8RA_CA_CERT) when not given.
    type: path
  timeout:
    description: Seconds to wait for one answer of the API.
    type: int
    default: 60
notes:
  - The module talks to the control plane's HTTP API (C(/api/v1)); run it where
    that is reachable, usually on C(localhost) with a local connection.
  - Like C(virt8ra apply), a task declares the whole resource; options left out
    take the API's defaults and are compared as such.
"""
