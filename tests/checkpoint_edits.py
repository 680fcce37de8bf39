"""Editing a saved checkpoint folder the way a broken download or a hand edit would, for the loaders' checks."""

import json


def edit_json(path, **changes) -> None:
    """Set top-level keys of the JSON file ``path`` (a `pathlib.Path`)."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
