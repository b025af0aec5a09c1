"""The ``webserver`` role's web side: cached cluster state, dashboard, JSON API, metrics.

One module per job: ``state`` keeps a compact copy of the cluster fetched from the
master, ``svg`` draws plots, ``dashboard`` renders HTML, ``api`` the JSON documents,
``metrics`` the Prometheus exposition and ``http`` serves them with the stdlib.
Nothing here talks to the master directly except ``state.refresh`` through the
``request`` callable it is given, so every page can be tested from fixture documents.
"""
