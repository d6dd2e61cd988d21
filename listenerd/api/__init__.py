"""The HTTP API: `app.create_app` builds it; one module per resource, each exporting `routes`."""
