"""Differential runner: `appliance img` against qemu-img on the same inputs.

    .venv/bin/python -m tests.qcow2.img_diff 'SETUP SHELL' 'ARGS' ['ARGS'...]

For each ARGS, SETUP runs (from scratch) in two directories, q/ and o/;
qemu-img ARGS runs in q/, `appliance img` ARGS in o/. Reported apart: stdout,
stderr (less the program name), exit code, and every file both leave behind
that differs in content (qemu-img compare), info (less dates and sizes on
disk) or check output. Setups must be deterministic (no random data; a
snapshot's date differs anyway). With RC21=1 a refused command line's exit
code 2 (the project's rule; qemu-img's is 1) is not reported; with SHOW=1
the outputs of each difference are printed. Exit code: the number of cases
that differ.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: str | list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, shell=isinstance(cmd, str),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _norm(text: str) -> str:
    return text.replace("appliance img: ", "qemu-img: ")


def _info(name: str, d: str) -> object:
    out = _run(["qemu-img", "info", "-U", "--output=json", name], d).stdout
    try:
        info = json.loads(out)
    except ValueError:
        return out
    for k in ("actual-size", "dirty-flag"):
        info.pop(k, None)
    for s in info.get("snapshots", []):
        for k in ("date-sec", "date-nsec"):
            s.pop(k, None)
    return info


def case(setup: str, args: str, *, show: bool = False) -> bool:
    base = tempfile.mkdtemp(prefix="img-diff-")
    q, o = f"{base}/q", f"{base}/o"
    for d in (q, o):
        os.mkdir(d)
        r = _run(setup, d)
        if r.returncode:
            print(f"SETUP FAILED: {setup}\n{r.stderr}")
            return False
    argv = shlex.split(args)
    theirs = _run(["qemu-img", *argv], q)
    ours = _run([sys.executable, "-m", "appliance.cli.main", "img", *argv], o)
    bad = []
    if theirs.stdout != ours.stdout:
        bad.append("stdout")
    if _norm(theirs.stderr) != _norm(ours.stderr):
        bad.append("stderr")
    if theirs.returncode != ours.returncode and not (
            os.environ.get("RC21") and (theirs.returncode, ours.returncode) == (1, 2)):
        bad.append("rc")
    for name in sorted(os.listdir(q)):
        if not os.path.isfile(f"{q}/{name}"):
            continue
        if not os.path.exists(f"{o}/{name}"):
            bad.append(f"missing:{name}")
            continue
        if Path(q, name).read_bytes() == Path(o, name).read_bytes():
            continue
        c = _run(["qemu-img", "compare", "-U", f"{q}/{name}", f"{o}/{name}"], base)
        if c.returncode:
            bad.append(f"content:{name}")
        if _info(name, q) != _info(name, o):
            bad.append(f"info:{name}")
        checks = [_run(["qemu-img", "check", "-U", name], d) for d in (q, o)]
        if (checks[0].stdout, checks[0].returncode) != (checks[1].stdout, checks[1].returncode):
            bad.append(f"check:{name}")
    print(f"{'DIFF' if bad else 'OK  '} img {args}  {' '.join(bad)}")
    if bad and (show or os.environ.get("SHOW")):
        print(f"  in {base}\n  qemu-img rc={theirs.returncode}\n{theirs.stdout}{theirs.stderr}"
              f"  ours rc={ours.returncode}\n{ours.stdout}{ours.stderr}")
    else:
        shutil.rmtree(base)
    return not bad


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    setup, *cases = argv
    return sum(not case(setup, a) for a in cases)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
