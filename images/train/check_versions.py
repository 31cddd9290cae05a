"""Build step of the train image: record the versions it holds, refuse an unexpected TE.

Writes a JSON file (argv[1]) of package -> version; exits non-zero when TE_VERSION is set and
the installed Transformer Engine is another, or when the data plane does not import.
"""

import json
import os
import sys
from importlib import metadata

PACKAGES = ("torch", "transformer_engine", "nvidia-modelopt", "transformers", "torchao", "datasets")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


versions = {name: installed(name) for name in PACKAGES}
wanted = os.environ.get("TE_VERSION")
if wanted and not (versions["transformer_engine"] or "").startswith(wanted):
    sys.exit(f"transformer_engine {versions['transformer_engine']} is not TE_VERSION {wanted}")
import stages.runtime  # noqa: E402,F401  (the data plane imports in this image)

with open(sys.argv[1], "w") as handle:
    json.dump(versions, handle, indent=2)
print(json.dumps(versions))
