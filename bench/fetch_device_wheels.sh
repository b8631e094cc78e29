#!/usr/bin/env bash
# Download the wheels that bench/device_check.sh carries to a GPU machine without network
# (bench/device_wheels.txt: CPython 3.12, manylinux_2_28 x86-64 - or the older manylinux tags such
# a machine also runs, which pip does not add by itself) into .whl/ at the repository root, and
# check that they stay under 64 MiB in all. Run it here, where PyPI is reachable:
#   bash bench/fetch_device_wheels.sh            # then carry .whl/ with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --dest "$DEST" \
  -r bench/device_wheels.txt
# only what the list names: an older download of another version would be installed too
"$PY" - "$DEST" "$LIMIT_MIB" <<'PYEOF'
import pathlib, re, sys
dest = pathlib.Path(sys.argv[1])
canon = lambda s: re.sub(r"[-_.]+", "-", s).lower()
want = {}
for line in pathlib.Path("bench/device_wheels.txt").read_text().splitlines():
    req = line.split("#", 1)[0].strip()
    if req:
        name, version = req.split("==")
        want[canon(name)] = version
total = 0
for w in sorted(dest.glob("*.whl")):
    name, version = w.name.split("-")[:2]
    if want.get(canon(name)) != version:
        print(f"removing {w.name}: not in bench/device_wheels.txt")
        w.unlink()
        continue
    total += w.stat().st_size
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
missing = set(want) - {canon(w.name.split("-")[0]) for w in dest.glob("*.whl")}
print(f"{total / 2**20:7.2f} MiB in all ({len(want)} listed)")
if missing:
    sys.exit(f"not downloaded: {sorted(missing)}")
limit = int(sys.argv[2])
if total > limit * 2**20:
    sys.exit(f"{total / 2**20:.1f} MiB: over the {limit} MiB that can be carried")
PYEOF
