"""The ``webserver`` role's web side: cached cluster state, dashboard, JSON API, metrics.

One module per job: ``state`` keeps a compact copy of the cluster fetched from the
master, ``svg`` draws plots, ``dashboard`` renders HTML, ``api`` the JSON documents,
``metrics`` the Prometheus exposition and ``http`` serves them with the stdlib.
Nothing here talks to the master directly except ``state.refresh`` through the
``request`` callable it is given, so every page can be tested from fixture documents.

What a webserver Pi serves on ``[webserver] webserver_host:webserver_port``
(default ``0.0.0.0:8123``), GET and HEAD only:

==========================  ==============================================================
``/``                       dashboard: one row per node (``<tr data-node-id=... data-state=...>``),
                            small SVG plots of CPU %, temperature and RAM used; reloads itself
``/nodes/<node_id>``        one node: large plots, latest vitals, details, action errors
``/api/nodes``              JSON ``{"master", "counts", "nodes", "fetched_at",
                            "master_reachable", "master_unreachable_since"}``
``/api/nodes/<node_id>``    JSON ``{"node", "history": [points, oldest first], ...}``;
                            unknown id: 404 ``{"error": "no node with id '...'"}``
``/metrics``                Prometheus text: ``rpicluster_node_up``,
                            ``rpicluster_node_state``, ``rpicluster_node_last_seen_age_seconds``,
                            ``rpicluster_node_cpu_percent``, ``..._temperature_celsius``,
                            ``..._memory_available_bytes``, ``..._disk_free_bytes``, ...,
                            ``rpicluster_master_*`` counters, ``rpicluster_nodes{state}``
``/healthz``                JSON ``{"status": "ok"|"degraded", "nodes", ...}``, always 200
==========================  ==============================================================

Pages are rendered at most once per snapshot and second, and gzipped for clients
that accept it. While the master is unreachable everything keeps answering with the
last known state ("master unreachable since ..." on the pages, ``master_reachable``
false in JSON, ``rpicluster_webserver_master_reachable 0`` in metrics).
"""
