"""The ``webserver`` role's web side: cached cluster state, dashboard, JSON API, metrics.

One module per job: ``state`` keeps a compact copy of the cluster fetched from the
master, ``svg`` draws plots, ``dashboard`` renders HTML (``page`` is the frame and its
escaping, ``plots`` picks the plots, ``nodepage`` one node), ``api`` the JSON documents,
``metrics`` the Prometheus exposition; ``http`` serves them with the stdlib
(``server`` is its event loop, ``handler`` answers one request).
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
``/metrics``                Prometheus text in base units, labels ``node_id`` and ``name``:
                            ``rpicluster_node_up``, ``rpicluster_node_state``,
                            ``rpicluster_node_cpu_usage_ratio``, ``..._temperature_celsius``,
                            ``..._throttled_now{condition}``, ``rpicluster_node_info``, ...,
                            ``rpicluster_master_*`` counters, ``rpicluster_nodes{state}``
``/healthz``                JSON ``{"status": "ok"|"degraded"|"store_failing", "nodes", ...}``;
                            200, or 503 when the master's store does not save
==========================  ==============================================================

Pages are rendered at most once per snapshot and second, and gzipped for clients
that accept it. While the master is unreachable everything keeps answering with the
last known state ("master unreachable since ..." on the pages, ``master_reachable``
false in JSON, ``rpicluster_webserver_master_reachable 0`` in metrics).
"""
