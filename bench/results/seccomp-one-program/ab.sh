#!/bin/bash
# A/B of nifty start --all for 1000 instances: old (4 seccomp filters) vs new (one program)
cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
for round in 1 2 3 4; do
  for v in old new; do
    c0=$(cpu); t0=$(date +%s.%N)
    ./nifty-$v --root /tmp/prof/root start --all >/dev/null 2>&1
    t1=$(date +%s.%N)
    sleep 4; c1=$(cpu)
    # only nifty's children in the window: use the start wall time plus total CPU ticks
    echo "$v round=$round start_s=$(echo "$t1 - $t0" | bc) cpu_ticks_4s=$((c1-c0))"
    ./nifty-$v --root /tmp/prof/root stop --all >/dev/null 2>&1
    sleep 2
  done
done
