"""The HTTP side: the application factory (``app``), what handlers share (``context``,
``errors``), one module per resource (scans, venues, declarations, the door, claims,
cases, reports, the audit log), the OpenAPI document and the web pages (``web``)."""
