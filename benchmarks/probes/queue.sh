#!/bin/bash
# Process job files named in benchmarks/probes/jobs/QUEUE (one per line) in order, each with runjobs.py; lines done
# are recorded in QUEUE.done. New lines may be appended while it runs.
cd "$(dirname "$0")/../.."
Q=benchmarks/probes/jobs/QUEUE
touch $Q $Q.done
while true; do
  next=$(grep -vxF -f $Q.done $Q | head -1)
  if [ -z "$next" ]; then sleep 10; continue; fi
  .venv/bin/python benchmarks/probes/runjobs.py "$next"
  echo "$next" >> $Q.done
done
