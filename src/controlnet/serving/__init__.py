"""``controlnet serve``: the shared serving core, the HTTP JSON API, the web app and the server."""
