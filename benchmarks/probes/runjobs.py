"""Run the shell commands of a job file (one per line, '#' comments skipped), PAR (default 2) at a time;
each command's output is appended to <jobfile>.log."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
path = sys.argv[1]
lines = [line.strip() for line in open(path) if line.strip() and not line.strip().startswith("#")]
def go(cmd):
    r = subprocess.run(cmd, shell=True, cwd=root, capture_output=True, text=True)
    with open(path + ".log", "a") as f:
        f.write(r.stdout + (r.stderr[-2000:] if r.returncode else ""))
with ThreadPoolExecutor(int(os.environ.get("PAR", 2))) as ex:
    list(ex.map(go, lines))
