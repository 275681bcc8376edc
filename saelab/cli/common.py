"""What every stage module of the ``saelab`` command shares."""

from __future__ import annotations

import json


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))
