"""Entry point of the standalone `edge-ssd` executable (tools/build_exe.sh).

The device runtime only: `edge-ssd export` is not in the executable (it needs torch). With
EDGE_SSD_EXE_MODULES=PATH set, the executable writes the names of the modules it imported
to PATH when it exits, so a test can check that no torch, onnx or exporter module is in it.
"""
import atexit
import os
import sys


def _dump_modules(path: str) -> None:
    with open(path, "w") as f:
        f.write("\n".join(sorted(sys.modules)) + "\n")


if __name__ == "__main__":
    if os.environ.get("EDGE_SSD_EXE_MODULES"):
        atexit.register(_dump_modules, os.environ["EDGE_SSD_EXE_MODULES"])
    if sys.argv[1:2] == ["export"]:
        print("this edge-ssd executable is the device runtime: export on a workstation with "
              "pip install 'edge-ssd[export]'", file=sys.stderr)
        sys.exit(2)
    from edge_ssd.cli import main

    sys.exit(main())
