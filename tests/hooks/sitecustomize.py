"""Loaded at start-up by a test server's processes (tests/server.py puts this directory on PYTHONPATH
only when a test asks for member faults): see member_faults.py."""

import member_faults

member_faults.install_from_env()
