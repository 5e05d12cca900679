"""systemd, as far as the harness needs it: unit files read the way systemd reads them, and a supervisor that boots
services from them the way systemd would, without systemd.

Reading a unit: `values` (the value syntax several directives share: time spans, sizes, signals, quoting),
`unitfile` (the file syntax: sections, repeated keys, specifiers, line numbers), `spec` (the [Unit]/[Service]
directives the supervisor honours, as a `ServiceSpec`), `deploy` (a production unit fitted onto a checkout).

Running it: `status` (what `systemctl status` shows, and systemd's exit and restart tables), `cgroups`
(MemoryMax=, MemoryHigh=, CPUQuota=, TasksMax= through cgroup v2 or v1), `process` (one process of a service: its
environment, spawn, journal capture), `service` (one service's start, exit and restart), `stopping` (stop, KillMode=, TimeoutStopSec=),
`supervisor` (the `Supervisor` that owns them all) and `exit_hooks` (nothing outlives the harness). Readiness
probes live in `harness.readiness`.

Nothing here runs at import time; import what you need from the module that defines it.
"""
