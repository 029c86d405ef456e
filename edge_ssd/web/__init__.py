"""The chat page's static files (index.html, app.js, style.css), served by edge_ssd.server.web.

A package only so that importlib.resources finds the files on every supported Python."""
