"""The local web app (feature browser, map, inspect, steer, monitor): ``saelab.web.app.create_app``."""
