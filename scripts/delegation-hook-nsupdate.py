#!/usr/bin/env python3
"""A `roll_lb.delegation_hook` for a parent zone that takes TSIG-signed dynamic updates
(RFC 2136), as the rehearsal's parent does (scripts/demo.sh), or a registrar's DNS that does.

The deployer runs it at roll-lb's hand-off with the new lbs' addresses as arguments and a
JSON description on stdin: {"zones": [...], "lbs": [{"name", "old_ip", "new_ip", ...}]}.
For every lb, the address record of its nameserver name (NAME.SUFFIX, which the parent's
NS records for the zones point at) is replaced by the new address, in one update per lb, then
read back from the parent until it answers the new address. Idempotent: run again with the
same input, it sets the same records.

Settings (environment):
  NSUPDATE_SERVER    the parent zone's primary server (address)
  NSUPDATE_KEY_FILE  a TSIG key file for `nsupdate -k` (BIND key statement, as tsig-keygen
                     writes it)
  NSUPDATE_SUFFIX    the zone the nameserver names live in (lb1 -> lb1.SUFFIX.), e.g. ns.test
  NSUPDATE_TTL       TTL of the address records (default 10)

Exits non-zero, naming what failed, if an update is refused or not visible within 30 s.
"""
import json
import os
import subprocess
import sys
import time


def main():
    try:
        server = os.environ["NSUPDATE_SERVER"]
        key_file = os.environ["NSUPDATE_KEY_FILE"]
        suffix = os.environ["NSUPDATE_SUFFIX"].strip(".")
    except KeyError as e:
        sys.exit(f"delegation-hook-nsupdate: {e.args[0]} is not set")
    ttl = int(os.environ.get("NSUPDATE_TTL", "10"))
    plan = json.load(sys.stdin)
    for lb in plan["lbs"]:
        name = f"{lb['name']}.{suffix}."
        new_ip = lb.get("new_ip") or lb["new_address"].rsplit(":", 1)[0].strip("[]")
        rtype = "AAAA" if ":" in new_ip else "A"
        script = (
            f"server {server}\n"
            f"update delete {name} A\n"
            f"update delete {name} AAAA\n"
            f"update add {name} {ttl} {rtype} {new_ip}\n"
            "send\n"
        )
        r = subprocess.run(["nsupdate", "-k", key_file], input=script, text=True,
                           capture_output=True, timeout=30)
        if r.returncode != 0:
            sys.exit(f"delegation-hook-nsupdate: update of {name} to {new_ip} at {server} "
                     f"failed: {(r.stderr or r.stdout).strip()}")
        deadline = time.monotonic() + 30
        while True:
            got = subprocess.run(["dig", "+short", "+norec", f"@{server}", name, rtype],
                                 text=True, capture_output=True, timeout=10).stdout.split()
            if got == [new_ip]:
                break
            if time.monotonic() > deadline:
                sys.exit(f"delegation-hook-nsupdate: {server} still answers {got} for {name}, "
                         f"not {new_ip}")
            time.sleep(0.2)
        print(f"{name} {rtype} {new_ip} at {server}", file=sys.stderr)


if __name__ == "__main__":
    main()
